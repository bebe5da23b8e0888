"""The demo proves something true: the synthetic corpus plants a hidden quality per reply (mining.synthetic),
and ahf.validation measures how much of it each stage recovers. On the fixed default seed: the adjusted rank
beats the raw score, SHP pairs agree with the truth, the reward model beats the length baseline; the truth
never reaches the store, and the corpus reads as text."""

from __future__ import annotations

import json
import re

import orjson
import pytest
import zstandard

from mining.synthetic import QUALITY, SyntheticSpec, generate, read_truth, vocabulary, words

# The default demo's figures (seed 7, 200 posts; README.md), asserted with a tolerance.
DEFAULT_FIGURES = {"spearman_raw": 0.380, "spearman_adjusted": 0.562, "shp_agreement": 0.991}


def _records(path) -> list[dict]:
    data = zstandard.ZstdDecompressor().decompress(path.read_bytes(), max_output_size=1 << 30)
    return [orjson.loads(line) for line in data.splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    paths = generate(tmp_path_factory.mktemp("corpus"), SyntheticSpec())
    return paths, _records(paths["posts"]), _records(paths["comments"]), read_truth(paths["truth"])


@pytest.fixture(scope="module")
def labelled(corpus, tmp_path_factory):
    """The default corpus ingested, its turns built and labelled (no index, no training: seconds)."""
    from feedback.labels import label_store
    from mining.ingest import ingest

    paths = corpus[0]
    store = tmp_path_factory.mktemp("labelled") / "store"
    assert ingest([paths["posts"], paths["comments"]], store).ok
    label_store(store)
    return store


def test_corpus_reads_as_text(corpus):
    """Every reply is made of the templates' words, in sentences that start with a capital and end with
    punctuation; every kind of reply (and every act) is there, and all of it is labelled synthetic."""
    _, posts, comments, truth = corpus
    vocab = vocabulary()
    replies = [c for c in comments if c["id"] in truth]
    assert len(replies) > 1000 and {t["kind"] for t in truth.values()} == set(QUALITY)
    assert {t["act"] for t in truth.values()} == {"story", "explanation", "qa", "summary", "other"}
    for c in replies:
        body = c["body"]
        assert set(words(body)) <= vocab, (body, set(words(body)) - vocab)
        assert body[0].isupper() or body.startswith(("tl;dr", "\"")), body
        assert re.search(r"[.!?]\"?$", body), body
        for sentence in re.split(r"(?<=[.!?])\"? (?=[A-Z\"])", body):
            assert re.search(r"[.!?:]\"?$", sentence), (sentence, body)
    for record in posts + comments:
        assert record["_synthetic"] is True and record["subreddit"].startswith("synthetic_")
    assert all(c["author"].startswith("synth_") for c in replies)
    assert all(p["author"].startswith("synth_") for p in posts)
    # no truth in the dumps: the records carry Reddit's fields only
    assert not {"quality", "kind", "act"} & {key for record in comments for key in record}


def test_lengths_do_not_give_quality_away(corpus):
    """Lengths are drawn before the quality level: per family, the mean words of each kind of top-level reply
    stay within 15 % of each other (test_votes_carry_... checks the length baseline of the pairs)."""
    _, _, comments, truth = corpus
    by_id = {c["id"]: c for c in comments}
    for family in ("synthetic_stories", "synthetic_explain", "synthetic_questions", "synthetic_life"):
        means = {}
        for kind in QUALITY:
            lengths = [len(by_id[cid]["body"].split()) for cid, t in truth.items()
                       if t["kind"] == kind and t["depth"] == 1 and by_id[cid]["subreddit"] == family]
            means[kind] = sum(lengths) / len(lengths)
        assert max(means.values()) <= 1.15 * min(means.values()), (family, means)


def test_corpus_is_deterministic(corpus, tmp_path):
    again = generate(tmp_path, SyntheticSpec())
    for key in ("posts", "comments", "truth"):
        assert again[key].read_bytes() == corpus[0][key].read_bytes()
    stamps = [r["created_utc"] for r in corpus[1] + corpus[2]]
    assert 1_117_584_000 <= min(stamps) and max(stamps) < 1_700_000_000  # after 2005-06-01, in the past


def test_truth_never_reaches_the_store(corpus, labelled):
    """No table and no column of the store holds the planted truth, and no file of the store names it."""
    from mining.store import Store

    with Store(labelled, read_only=True) as store:
        columns = store.rows("SELECT table_name, column_name FROM information_schema.columns")
        bodies = store.value("SELECT count(*) FROM comments WHERE body LIKE '%quality%'")
    tables = {t for t, _ in columns}
    assert {"comments", "turns", "labels", "pairs"} <= tables and not any("truth" in t for t in tables)
    assert not {c for _, c in columns} & {"quality", "kind", "hidden_quality", "truth"}
    assert bodies == 0
    assert not [p for p in labelled.rglob("*") if "truth" in p.name]
    assert corpus[0]["truth"].parent != labelled and not corpus[0]["truth"].is_relative_to(labelled)


def test_votes_carry_the_truth_through_their_confounds(corpus, labelled):
    """The corpus-level goals, without index or training: the adjusted rank beats the raw score by 0.1
    in Spearman with the hidden quality, >= 90 % of SHP pairs agree with it, tiers and reply sentiment
    follow it."""
    from ahf.validation import validate

    v = validate(labelled, corpus[0]["truth"])
    assert v["spearman_adjusted"] - v["spearman_raw"] >= 0.1
    assert v["shp_agreement"] >= 0.9 and v["shp_pairs"] > 200
    for key, value in DEFAULT_FIGURES.items():
        assert v[key] == pytest.approx(value, abs=0.02), key
    assert v["tier_mean_quality"]["good"] > v["tier_mean_quality"]["ok"] > v["tier_mean_quality"]["bad"]
    assert v["tier_purity"] >= 0.7 and v["sentiment_agreement"] >= 0.75
    assert abs(v["pairs_length_baseline"] - 0.5) <= 0.05  # the longer reply wins half the pairs: a coin
    assert v["time_adjacent_agreement"] + v["time_adjacent_ties"] >= 0.9  # wrong way round: rare
    assert v["rm_accuracy"] is None and "rm_beats_length" not in v["goals"]  # no model given
    assert v["goals"]["adjusted_beats_raw"]["met"] and v["goals"]["shp_agreement"]["met"]


@pytest.mark.slow  # the whole default demo: about 3 minutes on 2 cores
def test_default_demo_meets_its_goals(tmp_path, capsys):
    from ahf.cli import main

    assert main(["demo", "--out", str(tmp_path), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    v = result["validation"]
    assert v == json.loads((tmp_path / "validation.json").read_text())
    assert {name: goal["met"] for name, goal in v["goals"].items()} == {
        "adjusted_beats_raw": True, "shp_agreement": True, "rm_beats_length": True}
    assert v["spearman_adjusted"] - v["spearman_raw"] >= 0.1 and v["shp_agreement"] >= 0.9
    assert v["rm_accuracy"] >= v["length_baseline"] + 0.15
    assert abs(v["length_baseline"] - 0.5) <= 0.1  # length does not give the quality away
    assert v["rm_accuracy"] <= v["quality_ceiling"] + 0.05 and v["rm_pairs"] >= 40
    for key, value in DEFAULT_FIGURES.items():
        assert v[key] == pytest.approx(value, abs=0.02), key
    assert v["rm_accuracy"] == pytest.approx(0.81, abs=0.05)  # README.md: 0.800 on 165 held-out pairs (0.812 when replies were truncated)
    assert set(v["act_precision"]) >= {"story", "explanation", "qa", "summary"}
    assert min(v["act_precision"][act] for act in ("story", "explanation", "qa", "summary")) >= 0.6
    report = result["report"]  # what `ahf report` reads
    assert report["models"] == [str(tmp_path / "models" / "rm")] and report["store"] == result["store"]
    assert report["truth"] == str(tmp_path / "corpus" / "truth.jsonl")
