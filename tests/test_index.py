"""The index stage end to end on real data: Lucene BM25, MiniLM + FAISS, fusion, acts, query, eval.

One small labelled check set (40 stories, 40 ELI5 explanations, ~150 real 2005 comments, every
subreddit "threads") is ingested and indexed once per module; the JVM starts once per process.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from ahf.console import UserError

N_STORIES, N_EXPLANATIONS, N_DISTRACTORS = 40, 40, 150


@pytest.fixture(scope="module")
def checkset_dir(shared_data, tmp_path_factory):
    from index.checkset import build_checkset, write_checkset

    out = tmp_path_factory.mktemp("checkset")
    write_checkset(build_checkset(shared_data, max_stories=N_STORIES, max_explanations=N_EXPLANATIONS,
                                  max_distractors=N_DISTRACTORS), out)
    return out


@pytest.fixture(scope="module")
def store(checkset_dir, tmp_path_factory):
    from index.build import build_index
    from mining.ingest import ingest
    from mining.turns import build_turns

    store_dir = tmp_path_factory.mktemp("store")
    ingest([checkset_dir / "RS_checkset.ndjson", checkset_dir / "RC_checkset.ndjson"], store_dir)
    build_turns(store_dir)
    result = build_index(store_dir, threads=2)
    return store_dir, result


@pytest.fixture(scope="module")
def tagged(store):
    from index.acts import tag_acts

    store_dir, _ = store
    return tag_acts(store_dir)


def _turns(store_dir):
    from index.corpus import read_turns
    from mining.store import Store

    with Store(store_dir, read_only=True) as s:
        return read_turns(s)


# ------------------------------------------------------------------------------------ corpus

def test_index_reads_the_one_turn_context(store):
    """The index's context is the store's turn context (tested against a reference in test_turns), its tail."""
    from index.corpus import CONTEXT_TAIL_CHARS, fetch_turns
    from mining.store import Store

    store_dir, _ = store
    turns = _turns(store_dir)
    ids = turns["comment_id"].to_pylist()
    with Store(store_dir, read_only=True) as s:
        full = dict(zip(ids, s.turn_rows()["context"].to_pylist()))
        fetched = fetch_turns(s, ids[::7])
    contexts = dict(zip(ids, turns["context"].to_pylist()))
    assert {cid: text[-CONTEXT_TAIL_CHARS:] for cid, text in full.items()} == contexts
    assert max(text.count("\n\n") for text in full.values()) >= 3  # real multi-level 2005 threads
    assert all(fetched[cid]["context"] == contexts[cid] for cid in ids[::7])


# ------------------------------------------------------------------------------------ BM25

def test_bm25_indexes_every_turn_and_finds_a_reply_by_its_words(store):
    from index.bm25 import BM25Searcher

    store_dir, result = store
    turns = _turns(store_dir)
    assert result["turns"] == turns.num_rows == result["bm25"]["docs"] == result["dense"]["docs"]
    searcher = BM25Searcher(store_dir / "index")
    try:
        assert searcher.num_docs == turns.num_rows
        # A distinctive sentence of one real reply finds that reply first.
        ids, replies = turns["comment_id"].to_pylist(), turns["reply"].to_pylist()
        target = max(range(len(replies)), key=lambda i: len(set(replies[i].split())))
        query = " ".join(replies[target].split()[:25])
        assert searcher.search(query, k=3)[0][0] == ids[target]
        # The context is a separate field: searching it for a post title finds that post's reply.
        first_story = next(i for i, cid in enumerate(ids) if cid.startswith("ws"))
        title = turns["title"].to_pylist()[first_story]
        by_context = searcher.search(title, k=5, fields={"context": 1.0})
        assert by_context[0][0] == ids[first_story]
        raw = json.loads(searcher.searcher.doc(ids[first_story]).raw())
        assert raw["contents"] == replies[first_story] and raw["context"].startswith(title)
    finally:
        searcher.close()


def test_bm25_search_equals_pyserini(store):
    """Our pruned IndexSearcher path ranks the same documents with the same scores as pyserini's
    LuceneSearcher (which rounds to 4 decimals and spaces ties 1e-6 apart), and `raw` of a hit
    equals pyserini's stored document."""
    from index.bm25 import BM25Searcher

    store_dir, _ = store
    turns = _turns(store_dir)
    replies = turns["reply"].to_pylist()
    queries = turns["title"].to_pylist()[::15] + [" ".join(r.split()[:12]) for r in replies[::40]]
    searcher = BM25Searcher(store_dir / "index")
    compared = 0
    try:
        for query in [q for q in queries if q and q.strip()]:
            ours = searcher.search(query, k=30)
            theirs = [(h.docid, h.score) for h in searcher.searcher.search(query, k=30)]
            assert len(ours) == len(theirs)
            assert [s for _, s in ours] == pytest.approx([s for _, s in theirs], abs=1e-4)
            if not ours:
                continue
            # identical documents, except where equal scores straddle the cut-off
            boundary = ours[-1][1] + 1e-3
            assert {d for d, s in ours if s > boundary} == {d for d, s in theirs if s > boundary}
            top = ours[0][0]
            assert searcher.raw(top) == json.loads(searcher.searcher.doc(top).raw())
            compared += 1
    finally:
        searcher.close()
    assert compared >= 10


def test_failed_bm25_build_leaves_the_previous_index(store, monkeypatch):
    from index import bm25
    from index.manifest import live_dir

    store_dir, _ = store
    root = store_dir / "index"
    before = live_dir(root, "bm25")

    def broken(input_dir, index_dir, threads):
        (index_dir / "half-written").write_text("x")
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(bm25, "run_indexer", broken)
    from mining.store import Store

    with Store(store_dir, read_only=True) as s, pytest.raises(RuntimeError, match="killed"):
        bm25.build_bm25(s, root, threads=2)
    assert live_dir(root, "bm25") == before
    assert sorted(p.name for p in root.glob("bm25-*")) == [before.name]
    searcher = bm25.BM25Searcher(root)
    assert searcher.num_docs == _turns(store_dir).num_rows
    searcher.close()


def test_bm25_shards_search_as_one_index(store, tmp_path):
    """Lucene shards (one per partition of threads) opened as one MultiReader give the one index's
    documents and scores: the corpus statistics are summed over the shards. Every turn is in exactly
    one shard, the same id lookups work, and a failed shard keeps the previous index live."""
    from index import bm25
    from index.manifest import live_dir, read_manifest
    from mining.store import Store

    store_dir, _ = store
    root = tmp_path / "sharded"
    with Store(store_dir, read_only=True) as s:
        report = bm25.build_bm25(s, root, threads=1, shards=3)
    entry = read_manifest(root)["bm25"]
    assert report.shards == len(entry["shards"]) == 3
    assert sum(shard["docs"] for shard in entry["shards"]) == report.docs == _turns(store_dir).num_rows
    assert all(shard["docs"] < report.docs for shard in entry["shards"])  # really split
    one, sharded = bm25.BM25Searcher(store_dir / "index"), bm25.BM25Searcher(root)
    assert sharded.num_docs == one.num_docs and sharded.shards == 3
    queries = ["once upon a time", "why does the sky look blue", "explain like I'm five", "reddit"]
    assert one.search("the") == sharded.search("the") == []  # a stop word alone
    for query in queries:
        for fields in (None, {"contents": 1.0, "context": 0.3}):
            a, b = one.search(query, k=20, fields=fields), sharded.search(query, k=20, fields=fields)
            assert len(a) == len(b) > 0
            # same scores (ties may come in another order); one index's multi-field path is pyserini's,
            # which rounds scores to 4 decimals
            tolerance = 1e-4 if fields else 1e-6
            assert [score for _, score in a] == pytest.approx([score for _, score in b], abs=tolerance)
            last = a[-1][1] + tolerance  # the same documents above the last score
            assert {d for d, sc in a if sc > last} == {d for d, sc in b if sc > last}
    hit = one.search("why", k=1)[0][0]
    assert sharded.raw(hit) == one.raw(hit)  # a hit of this searcher's last search, and a lookup
    sharded.search("once upon a time", k=1)
    assert sharded.raw(hit)["id"] == hit
    assert sharded.batch_search(queries[:2], k=5) == [sharded.search(q, k=5) for q in queries[:2]]
    with pytest.raises(UserError, match="not in the BM25 index"):
        sharded.raw("no-such-id")
    one.close()
    sharded.close()
    before = live_dir(root, "bm25")
    calls = []

    def broken(input_dir, index_dir, threads):
        calls.append(index_dir)
        if len(calls) == 2:
            raise RuntimeError("killed mid-build")
        bm25.run_indexer.__wrapped__(input_dir, index_dir, threads)

    broken.__wrapped__ = bm25.run_indexer
    import unittest.mock

    with unittest.mock.patch.object(bm25, "run_indexer", broken), Store(store_dir, read_only=True) as s, \
            pytest.raises(RuntimeError, match="killed"):
        bm25.build_bm25(s, root, threads=1, shards=3)
    assert live_dir(root, "bm25") == before and sorted(p.name for p in root.glob("bm25-*")) == [before.name]


# ------------------------------------------------------------------------------------ dense

def test_dense_extends_without_reencoding(store, tmp_path):
    from index.dense import DenseConfig, DenseSearcher, build_dense

    store_dir, first = store
    assert first["dense"]["encoded"] > 0 and first["dense"]["index_type"] == "flat"
    turns = _turns(store_dir)
    ids, replies = turns["comment_id"].to_pylist(), turns["reply"].to_pylist()
    root = tmp_path / "index"
    shutil.copytree(store_dir / "index" / "embeddings", root / "embeddings")  # the warm cache
    config = DenseConfig()
    base = build_dense(ids[:-20], replies[:-20], root, config)
    assert (base.encoded, base.mode) == (0, "new")  # all from the cache
    new_texts = [f"{r} (edited again)" for r in replies[-20:]]
    grown = build_dense(ids, replies[:-20] + new_texts, root, config)
    assert grown.mode == "extended"
    assert grown.encoded == len(set(new_texts)) and grown.cached == len(ids) - 20
    searcher = DenseSearcher(root)
    assert searcher.index.ntotal == len(ids) and searcher.ids[:len(ids) - 20] == ids[:-20]
    # An appended row answers its own text first.
    assert searcher.search(new_texts[3], k=1)[0][0] == ids[-20 + 3]
    # A changed text of an old turn forces a rebuild, again without encoding old texts.
    changed = replies[:-20] + new_texts
    changed[0] = new_texts[0]
    rebuilt = build_dense(ids, changed, root, config)
    assert (rebuilt.mode, rebuilt.encoded) == ("rebuilt", 0)
    assert len(list(root.glob("dense-*"))) == 1


def test_onnx_query_encoder_reproduces_sentence_transformers(store, tmp_path):
    """The query path's ONNX encoder gives sentence-transformers' vectors, and the searcher uses it."""
    from index.dense import DenseSearcher
    from index.query_encoder import ONNX_FILE, onnx_query_encoder

    store_dir, _ = store
    searcher = DenseSearcher(store_dir / "index")
    queries = _turns(store_dir)["title"].to_pylist()[::9] + ["why?", "tl;dr " * 200]  # one past 256 tokens
    expected = searcher.encoder.encode(queries)
    got = np.concatenate([searcher.encode_query(q) for q in queries])
    assert searcher.query_backend == "onnx", searcher.query_backend_note
    assert searcher._onnx_encoder().tokenizer is not None  # the direct Rust tokenizer, checked at load
    assert np.abs(got - expected).max() < 1e-4
    # A stale export (here: a file that is not the model) is refused, never trusted.
    (tmp_path / ONNX_FILE).write_bytes(b"not onnx")
    encoder, why = onnx_query_encoder(searcher.encoder.model, tmp_path)
    assert encoder is None and "failed" in why


def test_hnsw_agrees_with_exact_search(store, tmp_path):
    from index.dense import DenseConfig, DenseSearcher, build_dense

    store_dir, _ = store
    turns = _turns(store_dir)
    ids, replies = turns["comment_id"].to_pylist(), turns["reply"].to_pylist()
    root = tmp_path / "index"
    shutil.copytree(store_dir / "index" / "embeddings", root / "embeddings")
    report = build_dense(ids, replies, root, DenseConfig(index_type="auto", hnsw_threshold=100))
    assert report.index_type == "hnsw" and report.encoded == 0
    hnsw = DenseSearcher(root)
    exact = DenseSearcher(store_dir / "index")
    queries = exact.vectors()[:25]
    _, rows_exact = exact.search_vectors(queries, 5)
    _, rows_hnsw = hnsw.search_vectors(queries, 5)
    overlap = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(rows_exact, rows_hnsw)])
    assert overlap >= 0.95
    # Filtered search returns only allowed rows.
    allowed = np.arange(0, len(ids), 3)
    _, rows = hnsw.search_vectors(queries[:3], 5, allowed_rows=allowed)
    assert set(rows.ravel().tolist()) <= set(allowed.tolist())
    # A prepared restriction (the query path's bitmap) gives exact search's answer among the allowed rows.
    vectors = exact.vectors()
    brute = np.argsort(-(queries[:3] @ vectors[allowed].T), axis=1)[:, :5]
    _, rows = exact.search_vectors(queries[:3], 5, restriction=exact.restriction(allowed))
    assert rows.tolist() == allowed[brute].tolist()


# ------------------------------------------------------------------------------------ fusion

def test_fusion_matches_pyserini_on_real_runs(store):
    from pyserini.fusion import interpolation, reciprocal_rank_fusion
    from pyserini.trectools import RescoreMethod, TrecRun

    from index.bm25 import BM25Searcher
    from index.dense import DenseSearcher
    from index.fusion import interpolate, rrf

    store_dir, _ = store
    bm25, dense = BM25Searcher(store_dir / "index"), DenseSearcher(store_dir / "index")
    compared = 0
    for query in ["why does the sky look blue", "she opened the door and whispered", "the election vote"]:
        runs = [bm25.search(query, k=60), dense.search(query, k=60)]
        trec = [TrecRun.from_list([("q", "Q0", d, r, s, "x") for r, (d, s) in enumerate(run, 1)]) for run in runs]
        for depth, k in [(None, None), (40, 25)]:
            ours = rrf(runs, rrf_k=60, depth=depth, k=k)
            theirs = reciprocal_rank_fusion(trec, rrf_k=60, depth=depth, k=k).run_data
            assert [d for d, _ in ours] == theirs["docid"].tolist()
            assert np.allclose([s for _, s in ours], theirs["score"].to_numpy(dtype=float))
            # pyserini's interpolation takes raw scores: give it min-max normalised runs.
            normed = [t.clone().rescore(method=RescoreMethod.NORMALIZE) for t in trec]
            ours = interpolate(runs, alpha=0.3, depth=depth, k=k)
            theirs = interpolation(normed, alpha=0.3, depth=depth, k=k).run_data
            assert [d for d, _ in ours] == theirs["docid"].tolist()
            assert np.allclose([s for _, s in ours], theirs["score"].to_numpy(dtype=float))
            compared += 1
    assert compared == 6
    bm25.close()


# ------------------------------------------------------------------------------------ acts

def test_acts_tag_every_turn_and_meet_precision_on_the_check_set(store, tagged, checkset_dir):
    from index.evaluate import eval_acts

    store_dir, _ = store
    assert tagged.turns == _turns(store_dir).num_rows == sum(tagged.counts.values())
    # k = half the positives of each act, as precision@50 is on the full set (498 / 404 positives).
    result = eval_acts(store_dir, checkset_dir / "labels.json", k=20)
    for act, min_recall in (("story", 0.9), ("explanation", 0.6)):
        r = result["acts"][act]
        assert r["returned"] == 20
        assert r["precision_at_20"] >= 0.9, (act, r)
        assert r["recall"] >= min_recall, (act, r)
    assert result["labels_not_in_store"] > 0  # deleted 2005 comments are labelled but are not turns


def test_weak_label_classifier_finds_stories_whose_prompt_lost_its_tag(store):
    """Strip the [WP]-style tag from half of the prompts: the structure cue goes to 0 for those
    stories, and the classifier, trained on the tagged half as positive-unlabelled data, still
    scores them as stories while the real 2005 comments stay low."""
    import pyarrow as pa

    from index.acts import load_acts_config, structure_scores
    from index.dense import DenseSearcher
    from index.weak import ClassifierConfig, classifier_scores

    store_dir, _ = store
    turns = _turns(store_dir)
    ids = np.array(turns["comment_id"].to_pylist())
    is_story = np.char.startswith(ids.astype(str), "ws")
    stripped = is_story & (np.arange(len(ids)) % 2 == 0)
    titles = [re.sub(r"^\s*[\[(]\s*\w\w\s*[\])]\s*", "", t) if cut else t
              for t, cut in zip(turns["title"].to_pylist(), stripped)]
    turns = turns.set_column(turns.schema.get_field_index("title"), "title", pa.array(titles))
    config = load_acts_config()
    structure = {name: structure_scores(turns, act) for name, act in config.acts.items()}
    assert structure["story"][stripped].max() < 0.6 <= structure["story"][is_story & ~stripped].min()

    dense = DenseSearcher(store_dir / "index")
    vectors = dense.vectors()[[dense.row[c] for c in ids]]
    scores, report = classifier_scores(vectors, structure, ClassifierConfig(min_positives=10))
    assert report.positives["story"] == int((is_story & ~stripped).sum())
    assert "summary" in report.skipped  # too few TL;DR replies to learn from: said, not guessed
    assert (scores["story"][stripped] >= 0.5).mean() >= 0.8
    assert (scores["story"][~is_story] >= 0.5).mean() <= 0.05  # ELI5 answers and 2005 comments
    assert not scores["summary"].any()


def test_acts_do_not_depend_on_subreddit_names(store, tagged, tmp_path):
    from index.acts import tag_acts
    from mining.store import Store

    store_dir, _ = store
    copy = tmp_path / "renamed"
    shutil.copytree(store_dir, copy)
    with Store(copy) as s:
        # Give every story the name that would give it away, and everything else a misleading one.
        s.replace_tables({"turns": "SELECT * REPLACE (CASE WHEN starts_with(comment_id, 'ws') "
                                   "THEN 'WritingPrompts' ELSE 'explainlikeimfive' END AS subreddit) FROM turns"})
    tag_acts(copy)
    with Store(store_dir, read_only=True) as a, Store(copy, read_only=True) as b:
        before = a.con.sql("SELECT comment_id, act, round(confidence, 9) FROM acts ORDER BY 1").fetchall()
        after = b.con.sql("SELECT comment_id, act, round(confidence, 9) FROM acts ORDER BY 1").fetchall()
    assert before == after


# ------------------------------------------------------------------------------------ CLI

def test_cli_query_json_and_filters(store, tagged, capsys):
    from ahf.cli import main

    store_dir, _ = store
    assert main(["query", "--act", "story", "--k", "5", "--store", str(store_dir), "--json"]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(hits) == 5
    assert all({"comment_id", "act", "score", "context", "reply"} <= set(h) for h in hits)
    assert all(h["act"] == "story" for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert all(h["context"].startswith("[") for h in hits)  # the prompt, e.g. "[WP] ...", comes first

    assert main(["query", "--act", "explanation", "--k", "3", "--store", str(store_dir), "--json",
                 "why does ice float on water"]) == 0
    hybrid = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(hybrid) == 3 and all(h["act"] == "explanation" for h in hybrid)
    assert main(["query", "--act", "explanation", "--k", "3", "--fusion", "interpolate", "--store",
                 str(store_dir), "--json", "why does ice float on water"]) == 0
    interpolated = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(interpolated) == 3 and all(0 <= h["score"] <= 1 for h in interpolated)

    assert main(["query", "--act", "story", "--subreddit", "nowhere", "--store", str(store_dir), "--json"]) == 0
    assert capsys.readouterr().out == ""
    assert main(["query", "--act", "poem", "--store", str(store_dir)]) == 2
    assert "unknown act 'poem'" in capsys.readouterr().err


def test_cli_eval_acts_json_and_bad_labels(store, tagged, checkset_dir, tmp_path, capsys):
    from ahf.cli import main

    store_dir, _ = store
    assert main(["eval", "acts", "--labels", str(checkset_dir / "labels.json"), "--k", "10",
                 "--store", str(store_dir), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["acts"]["story"]["precision_at_10"] == 1.0
    assert result["acts"]["qa"]["precision_at_10"] is None  # nobody labelled qa: nothing to measure
    assert result["label_counts"]["story"] == N_STORIES
    bad = tmp_path / "labels.json"
    bad.write_text('{"a": "story",\n "b": 3}')
    assert main(["eval", "acts", "--labels", str(bad), "--store", str(store_dir)]) == 2
    assert "labels.json: field 'b'" in capsys.readouterr().err
    bad.write_text('{"a": "story",\n oops}')
    with pytest.raises(UserError, match="labels.json: line 2"):
        from index.evaluate import load_labels

        load_labels(bad)


def test_cli_index_refresh_reuses_the_cache_and_tags(store, tagged, capsys):
    from ahf.cli import main

    store_dir, _ = store
    assert main(["index", "--store", str(store_dir), "--threads", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["dense"]["encoded"] == 0 and result["dense"]["mode"] == "unchanged"
    assert result["bm25"]["docs"] == result["turns"]
    assert main(["acts", "tag", "--store", str(store_dir), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["acts"] == tagged.counts
