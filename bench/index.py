"""Benchmark of the index stage: build rates and act-query latency at scaled sizes.

    python bench/index.py --data ../shared/data --sizes 10000 100000 [1000000] [--out bench/out/index.json]

The corpus is the real labelled check set (index.checkset: WritingPrompts stories, ELI5 answers,
the December 2005 comment dump) scaled by repeating its turns with fresh comment ids, so the
large runs hit the embedding cache and encode only the unique texts. Reported, all in one run:
- encoder: sentence-transformers `encode` alone on the unique texts (texts/s), and our cold
  dense build on the same texts (cache empty): the ratio is the dense-build overhead;
- per size: BM25 build (turns/s, Lucene via Anserini in-process, warm JVM) next to bm25s
  indexing the same replies; dense build from a warm cache (turns/s); act tagging (turns/s);
- per size: latency p50/p99 of `ActSearcher.query(act, TEXT, k=10)` (hybrid BM25 + dense,
  fused, with the lookup of context and reply), of the act query without TEXT, and of a bare
  pyserini `LuceneSearcher.search(k=10)` and bm25s `retrieve(k=10)` on the same queries, each in
  its own loop after `--warmup` disjoint queries (whose latencies are reported as the searcher's
  first queries); then the hybrid query's two parts alone: the query encoding and our BM25 top 50.

`--query-only STORE` measures only the query latencies on an existing store (index and acts built).
`--ivfpq-only` measures only the sharded IVF-PQ index (bench_ivfpq): per size, its build from a warm
cache (turns/s, training and shard time, bytes per vector in memory and on disk) and the latency of
one-vector searches next to the flat index; and recall@10 against exact search on the distinct
base turns (the scaled corpora repeat each text, so a recall there would only count copies).
`--bm25-shards N` measures only BM25 as N Lucene shards (bench_bm25_shards): per size, the build as one
index, as N shards one after another (local engine) and as N shards on Ray tasks (a local Ray instance
with this machine's cores), and our BM25 top 50 on one index against the shards searched as one.
`--ray-encoding N` measures only the encoding of N distinct base replies (empty caches): the local
engine twice (the first call pays the imports and the model load), then Ray Data actors on a local
Ray instance with this machine's cores (bench_ray_encoding).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
# The DuckDB-file store: this benchmark copies a base store's ahf.duckdb, and its anchors in docs/bench
# were measured on that format (bench/scale.py compares it with Delta, the default).
os.environ.setdefault("AHF_STORE_FORMAT", "duckdb")
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def percentiles(samples: list[float]) -> dict:
    ms = np.array(samples) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "n": len(samples)}


def make_base_store(data: Path, work: Path) -> Path:
    from index.checkset import build_checkset, write_checkset
    from mining.ingest import ingest

    write_checkset(build_checkset(data), work / "checkset")
    store = work / "base"
    shutil.rmtree(store, ignore_errors=True)
    ingest([work / "checkset" / "RS_checkset.ndjson", work / "checkset" / "RC_checkset.ndjson"], store)
    return store


def scaled_store(base: Path, size: int, work: Path) -> Path:
    """A copy of the base store whose `turns` holds `size` turns: repeats with fresh comment ids."""
    from mining.store import Store

    dest = work / f"store-{size}"
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir()
    shutil.copy(base / "ahf.duckdb", dest / "ahf.duckdb")
    with Store(dest) as s:
        n = s.con.sql("SELECT count(*) FROM turns").fetchall()[0][0]
        copies = -(-size // n)
        s.con.execute(f"""
            CREATE TABLE turns_scaled AS
            SELECT * REPLACE (CASE WHEN r = 0 THEN comment_id ELSE comment_id || 'x' || r END AS comment_id)
            FROM turns, range({copies}) AS t(r)
            ORDER BY r, comment_id LIMIT {size}""")
        s.con.execute("DROP TABLE turns")
        s.con.execute("ALTER TABLE turns_scaled RENAME TO turns")
    return dest


def bench_encoder(store: Path, work: Path, sample: int, warm_cache: str | None) -> dict:
    """The bare encoder vs our cold dense build (empty cache), on the same `sample` unique texts.

    Returns the stats and a cache holding every base text (from `warm_cache` plus what is missing)."""
    from index.corpus import read_turns
    from index.dense import DenseConfig, Encoder, build_dense
    from mining.store import Store

    with Store(store, read_only=True) as s:
        turns = read_turns(s)
    all_ids, all_texts = turns["comment_id"].to_pylist(), turns["reply"].to_pylist()
    # An even spread of the base turns (stories, answers and 2005 comments alike), unique texts.
    seen, ids, texts = set(), [], []
    for i in np.linspace(0, len(all_ids) - 1, min(sample, len(all_ids))).astype(int):
        if all_texts[i] not in seen:
            seen.add(all_texts[i])
            ids.append(all_ids[i])
            texts.append(all_texts[i])
    encoder = Encoder()
    encoder.encode(texts[:16])  # warm-up (weights into memory, threads spun up)
    started = time.perf_counter()
    encoder.encode(texts)
    bare_s = time.perf_counter() - started
    cold = work / "cold-index"
    shutil.rmtree(cold, ignore_errors=True)
    report = build_dense(ids, texts, cold, DenseConfig())
    stats = {"texts": len(texts), "words_mean": round(float(np.mean([len(t.split()) for t in texts])), 1),
             "device": encoder.device, "bare_encode_texts_per_s": round(len(texts) / bare_s, 1),
             "cold_dense_build_turns_per_s": round(len(ids) / report.seconds, 1),
             "ratio": round((len(ids) / report.seconds) / (len(texts) / bare_s), 3),
             "cold_encoded": report.encoded}
    # The cache for the scaled runs: every base text (encodes only what `warm_cache` lacks).
    full = work / "full-index"
    shutil.rmtree(full, ignore_errors=True)
    if warm_cache:
        shutil.copytree(warm_cache, _cache_dir(full))
    report = build_dense(all_ids, all_texts, full, DenseConfig())
    stats["base_turns"], stats["base_encoded_now"] = len(all_ids), report.encoded
    return stats, full / "embeddings"


def _cache_dir(root: Path) -> Path:
    from index.dense import DenseConfig, cache_dir

    return cache_dir(root, DenseConfig().encoder)


def timed(call, items) -> list[float]:
    samples = []
    for item in items:
        started = time.perf_counter()
        call(*item)
        samples.append(time.perf_counter() - started)
    return samples


def bench_queries(store: Path, queries: list[tuple[str, str]], warmup: list[tuple[str, str]], retriever=None) -> dict:
    """Latency of each query path, each in its own loop over the same queries (interleaving them
    lets one path's memory traffic land in the next one's figures).

    The searcher first answers `warmup` queries disjoint from the measured ones: a query server
    is long-running, and its first queries after load pay the JVM's JIT compilation and first
    touches of index pages. Those first queries are reported too (`hybrid_act_query_first`)."""
    import bm25s

    from index.bm25 import BM25Searcher
    from index.query import ActSearcher

    root = store / "index"
    lucene = BM25Searcher(root)
    samples: dict[str, list[float]] = {}
    with ActSearcher(store) as searcher:
        searcher.query(queries[0][0], queries[0][1], k=10)  # loads the JVM side, FAISS and the encoder
        samples["hybrid_act_query_first"] = timed(lambda act, text: searcher.query(act, text, k=10), warmup)
        samples["hybrid_act_query"] = timed(lambda act, text: searcher.query(act, text, k=10), queries)
        samples["act_query_no_text"] = timed(lambda act, text: searcher.query(act, None, k=10), queries)
        # the hybrid query's two big parts alone (in the query they overlap: encoder thread + Lucene)
        samples["query_encoding"] = timed(lambda act, text: searcher._dense.encode_query(text), queries)
        samples["bm25_top50_ours"] = timed(lambda act, text: searcher._bm25.search(text, k=searcher.bm25_depth),
                                           queries)
        backend = searcher._dense.query_backend
    timed(lambda act, text: lucene.searcher.search(text, k=10), warmup)
    samples["pyserini_lucene_k10"] = timed(lambda act, text: lucene.searcher.search(text, k=10), queries)
    lucene.close()
    if retriever is not None:
        def bm25s_k10(act, text):
            retriever.retrieve(bm25s.tokenize([text], stopwords="en", show_progress=False), k=10, show_progress=False)

        timed(bm25s_k10, warmup)
        samples["bm25s_k10"] = timed(bm25s_k10, queries)
    return {"query_encoder_backend": backend, "queries": len(queries), "warmup_queries": len(warmup),
            "latency": {name: percentiles(v) for name, v in samples.items()}}


def bench_size(base: Path, size: int, work: Path, cache: Path, queries: list[tuple[str, str]],
               warmup: list[tuple[str, str]]) -> dict:
    import bm25s

    from index.acts import tag_acts
    from index.bm25 import build_bm25
    from index.corpus import read_turns
    from index.dense import DenseConfig, build_dense
    from mining.store import Store

    store = scaled_store(base, size, work)
    root = store / "index"
    shutil.copytree(cache, root / "embeddings")
    out: dict = {"turns": size}
    with Store(store, read_only=True) as s:
        started = time.perf_counter()
        turns = read_turns(s)
        out["read_turns_s"] = round(time.perf_counter() - started, 3)
        report = build_bm25(s, root, threads=2)
    out["bm25_build_turns_per_s"] = round(size / report.seconds, 1)
    ids, texts = turns["comment_id"].to_pylist(), turns["reply"].to_pylist()

    started = time.perf_counter()
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    out["bm25s_build_turns_per_s"] = round(size / (time.perf_counter() - started), 1)

    dense = build_dense(ids, texts, root, DenseConfig())
    out["dense_cached_build_turns_per_s"] = round(size / dense.seconds, 1)
    out["dense_index_type"], out["dense_encoded"] = dense.index_type, dense.encoded

    out["ivfpq"] = bench_ivfpq(root, ids, texts)

    tagged = tag_acts(store)
    out["tag_turns_per_s"] = round(size / tagged.seconds, 1)
    out["acts"] = tagged.counts

    out.update(bench_queries(store, queries, warmup, retriever))
    shutil.rmtree(store, ignore_errors=True)
    return out


def bench_ivfpq(root: Path, ids: list[str], texts: list[str], shards: int = 2, queries: int = 200) -> dict:
    """The sharded IVF-PQ build from the warm cache under `root` (config defaults, `shards` shards)
    and the latency of one-vector searches (real turn vectors) on it and on the flat index."""
    from index.dense import DenseConfig, DenseSearcher, build_dense

    flat_root, ivf_root = root.parent / "bench-flat", root.parent / "bench-ivfpq"
    for where in (flat_root, ivf_root):
        shutil.rmtree(where, ignore_errors=True)
        shutil.copytree(root / "embeddings", where / "embeddings")
    build_dense(ids, texts, flat_root, DenseConfig(index_type="flat"))
    report = build_dense(ids, texts, ivf_root, DenseConfig(index_type="ivfpq", shards=shards))
    searcher, flat = DenseSearcher(ivf_root), DenseSearcher(flat_root)
    out = {"shards": shards, "build_turns_per_s": round(len(ids) / report.seconds, 1),
           "train_s": searcher.meta["train_s"], "shards_s": searcher.meta["shards_s"],
           "recall": "not measured on repeated texts: see ivfpq_recall (distinct turns)"}
    live = Path(searcher.dir)
    codes = sum((live / s["dir"] / "index").stat().st_size for s in searcher.meta["shards"])
    out["index_bytes_per_vector"] = round(codes / len(ids), 1)  # what a searcher holds in memory
    out["flat_bytes_per_vector"] = round((flat.dir / "index").stat().st_size / len(ids), 1)
    sample = flat.vectors()[np.linspace(0, len(ids) - 1, queries).astype(int)]
    for name, s in (("ivfpq", searcher), ("flat", flat)):
        s.search_vectors(sample[:10], 10)  # warm-up
        out[f"{name}_search_k10"] = percentiles(timed(lambda q: s.search_vectors(q[None], 10), [(q,) for q in sample]))
    for where in (flat_root, ivf_root):
        shutil.rmtree(where, ignore_errors=True)
    return out


def bench_bm25_shards(base: Path, size: int, work: Path, shards: int, queries: list[tuple[str, str]]) -> dict:
    """BM25 at `size` turns: one index against `shards` Lucene shards (built on the local engine and
    on Ray), and the top-50 latency of one index against the shards as one MultiReader."""
    from ahf.engine import make_engine
    from index.bm25 import BM25Searcher, build_bm25
    from mining.store import Store

    store = scaled_store(base, size, work)
    out: dict = {"turns": size, "shards": shards}
    builds = {"one index": (1, "local"), f"{shards} shards, local engine": (shards, "local"),
              f"{shards} shards, ray": (shards, "ray")}
    for name, (n, engine_name) in builds.items():
        root = work / f"bm25-{n}-{engine_name}"
        shutil.rmtree(root, ignore_errors=True)
        with make_engine(engine_name) as engine, Store(store, read_only=True) as s:
            started = time.perf_counter()  # the Ray instance's start-up is not counted
            report = build_bm25(s, root, shards=n, engine=engine)
        seconds = time.perf_counter() - started
        out[name] = {"build_s": round(seconds, 2), "turns_per_s": round(report.docs / seconds, 1), "root": str(root)}
    for name in ("one index", f"{shards} shards, local engine"):
        searcher = BM25Searcher(out[name].pop("root"))
        for _, text in queries[:20]:
            searcher.search(text, 50)  # warm-up
        out[name]["search_k50"] = percentiles(timed(lambda text: searcher.search(text, 50), [(t,) for _, t in queries]))
        searcher.close()
    out[f"{shards} shards, ray"].pop("root")
    shutil.rmtree(store, ignore_errors=True)
    return out


def bench_ivfpq_recall(base: Path, cache: Path) -> dict:
    """recall@10 of the IVF-PQ index (defaults) against exact search on the distinct base turns."""
    from index.corpus import read_turns
    from index.dense import DenseConfig, build_dense
    from mining.store import Store

    with Store(base, read_only=True) as s:
        turns = read_turns(s)
    seen, ids, texts = set(), [], []
    for cid, text in zip(turns["comment_id"].to_pylist(), turns["reply"].to_pylist()):
        if text not in seen:
            seen.add(text)
            ids.append(cid)
            texts.append(text)
    root = cache.parent.parent / "recall-ivfpq"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(cache, root / "embeddings")
    out = {"distinct_turns": len(ids)}
    for nprobe in (4, 16):
        report = build_dense(ids, texts, root, DenseConfig(index_type="ivfpq", nprobe=nprobe))
        out[f"nprobe_{nprobe}"] = report.recall
    shutil.rmtree(root, ignore_errors=True)
    return out


def bench_ray_encoding(base: Path, work: Path, n: int) -> dict:
    """Texts/s of `embed_texts` for the same `n` distinct replies: local (twice), then on Ray."""
    from ahf.engine import make_engine
    from index.corpus import read_turns
    from index.dense import DenseConfig, EmbeddingCache, Encoder, embed_texts
    from mining.store import Store

    with Store(base, read_only=True) as s:
        distinct = list(dict.fromkeys(read_turns(s)["reply"].to_pylist()))
    texts = [distinct[i] for i in np.linspace(0, len(distinct) - 1, min(n, len(distinct))).astype(int)]
    out: dict = {"texts": len(texts), "words_mean": round(float(np.mean([len(t.split()) for t in texts])), 1)}
    vectors = {}
    for name in ("local_first", "local", "ray"):
        cache = work / f"ray-encoding-{name}"
        shutil.rmtree(cache, ignore_errors=True)
        with make_engine("ray" if name == "ray" else "local") as engine:
            started = time.perf_counter()
            vectors[name], _ = embed_texts(texts, EmbeddingCache(cache), Encoder, engine=engine, config=DenseConfig())
            out[f"{name}_texts_per_s"] = round(len(texts) / (time.perf_counter() - started), 1)
        if name == "ray":
            out["ray_workers"] = engine.workers
        shutil.rmtree(cache, ignore_errors=True)
    out["max_abs_difference"] = float(np.abs(vectors["ray"] - vectors["local"]).max())
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=200, help="measured act queries (half story, half explanation)")
    parser.add_argument("--warmup", type=int, default=100, help="disjoint act queries answered before measuring")
    parser.add_argument("--query-only", metavar="STORE",
                        help="only the query latencies, on an existing store with its index and acts")
    parser.add_argument("--work", help="scratch directory (default: a temporary one)")
    parser.add_argument("--encoder-sample", type=int, default=300, help="texts for the bare-vs-cold encoder run")
    parser.add_argument("--warm-cache", help="an embedding cache dir (STORE/index/embeddings/<encoder>) to start from")
    parser.add_argument("--ivfpq-only", action="store_true", help="only the sharded IVF-PQ figures (bench_ivfpq)")
    parser.add_argument("--bm25-shards", type=int, metavar="N", help="only BM25 as N Lucene shards (bench_bm25_shards)")
    parser.add_argument("--ray-encoding", type=int, metavar="N", help="only the encoding rate, local vs Ray, on N texts")
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "index.json"))
    args = parser.parse_args()

    from index.jvm import ensure_jvm

    ensure_jvm()
    work = Path(args.work or tempfile.mkdtemp(prefix="ahf-bench-index-"))
    work.mkdir(parents=True, exist_ok=True)
    base = make_base_store(Path(args.data), work)

    from index.checkset import build_checkset

    checkset = build_checkset(Path(args.data), max_distractors=0)
    # Act queries: prompts ask for stories, questions for explanations (both real titles).
    prompts = [p["title"] for p in checkset.posts if p["id"].startswith("wp")]
    questions = [p["title"] for p in checkset.posts if not p["id"].startswith("wp")]
    half = args.queries // 2
    queries = [("story", t) for t in prompts[:half]] + [("explanation", t) for t in questions[:args.queries - half]]
    warm = args.warmup // 2
    warmup = ([("story", t) for t in prompts[half:half + warm]]
              + [("explanation", t) for t in questions[args.queries - half:args.queries - half + args.warmup - warm]])
    if len(queries) < args.queries or len(warmup) < args.warmup:
        raise SystemExit(f"the check set has {len(prompts)} prompts and {len(questions)} questions: "
                         "fewer --queries/--warmup")
    if args.query_only:
        print(json.dumps(bench_queries(Path(args.query_only), queries, warmup), indent=2))
        return 0
    if args.ray_encoding:
        print(json.dumps(bench_ray_encoding(base, work, args.ray_encoding), indent=2))
        return 0
    if args.bm25_shards:
        result = {size: bench_bm25_shards(base, size, work, args.bm25_shards, queries) for size in args.sizes}
        print(json.dumps(result, indent=2))
        return 0

    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version()}, "sizes": {}}
    result["encoder"], cache = bench_encoder(base, work, args.encoder_sample, args.warm_cache)
    print(json.dumps(result["encoder"]), flush=True)
    result["ivfpq_recall"] = bench_ivfpq_recall(base, cache)
    print(json.dumps({"ivfpq_recall": result["ivfpq_recall"]}), flush=True)
    for size in args.sizes if args.ivfpq_only else ():
        from index.corpus import read_turns
        from mining.store import Store

        store = scaled_store(base, size, work)
        with Store(store, read_only=True) as s:
            turns = read_turns(s)
        shutil.copytree(cache, store / "index" / "embeddings")
        result["sizes"][str(size)] = {"turns": size, "ivfpq": bench_ivfpq(
            store / "index", turns["comment_id"].to_pylist(), turns["reply"].to_pylist())}
        print(json.dumps({str(size): result["sizes"][str(size)]}), flush=True)
        shutil.rmtree(store, ignore_errors=True)
    for size in () if args.ivfpq_only else args.sizes:
        result["sizes"][str(size)] = bench_size(base, size, work, cache, queries, warmup)
        print(json.dumps({str(size): result["sizes"][str(size)]}), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
