"""Verbs of the index stage: `index`, `acts tag|checkset`, `query`, `eval acts` (`eval` is shared
with the training stage's `eval rm`, see ahf.args.shared_verb)."""

from __future__ import annotations

import argparse

from ahf.args import add_config, add_engine, add_json, add_store, shared_verb
from ahf.console import emit, progress_bar


def _common(p: argparse.ArgumentParser, store: bool = True) -> None:
    if store:
        add_store(p)
        p.add_argument("--index-dir", help="index root (default: STORE/index)")
    add_json(p)


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("index", help="build BM25 (Lucene) and dense (FAISS) indexes over the turns")
    _common(p)
    p.add_argument("--encoder", help="sentence-transformers model name or path (default: all-MiniLM-L6-v2, offline)")
    p.add_argument("--index-type", choices=["auto", "flat", "hnsw", "ivfpq"],
                   help="FAISS index (default auto: by size; ivfpq: sharded, past one machine's memory)")
    p.add_argument("--only", choices=["bm25", "dense"], help="build one side only")
    p.add_argument("--threads", type=int, help="Lucene indexing threads (default: CPU count, at most 8)")
    add_engine(p)
    add_config(p, "index")
    p.set_defaults(handler=run_index)

    acts = subparsers.add_parser("acts", help="dialog acts: tag turns, build the labelled check set")
    acts_sub = acts.add_subparsers(dest="acts_command", metavar="WHAT", required=True)
    p = acts_sub.add_parser("tag", help="tag every turn with its dialog act and a confidence (table `acts`)")
    _common(p)
    add_config(p, "acts")
    add_engine(p)
    p.set_defaults(handler=run_acts_tag)
    p = acts_sub.add_parser("checkset", help="write the labelled check set built from ../shared/data")
    p.add_argument("--data", default="../shared/data", help="the shared real-data folder")
    p.add_argument("--out", required=True, help="output directory (NDJSON files + labels.json)")
    p.add_argument("--subreddit", default="threads", help="the one neutral subreddit name for every record")
    _common(p, store=False)
    p.set_defaults(handler=run_checkset)

    p = subparsers.add_parser("query", help="top turns of a dialog act, optionally ranked by relevance to TEXT")
    p.add_argument("text", nargs="?", help="rank the act's turns by hybrid (BM25 + dense) relevance to this")
    p.add_argument("--act", required=True, help="act name (configs/acts.yaml), e.g. story")
    p.add_argument("--k", type=int, default=10, help="number of hits (default 10)")
    p.add_argument("--subreddit", help="only turns from this subreddit")
    p.add_argument("--fusion", choices=["rrf", "interpolate"], default="rrf", help="how BM25 and dense fuse")
    _common(p)
    p.set_defaults(handler=run_query)

    evals = shared_verb(subparsers, "eval", "evaluate a stage's output against labels or held-out data")
    p = evals.add_parser("acts", help="precision@k and recall of the act tagger against labels")
    p.add_argument("--labels", required=True, help="JSON file mapping comment ids to act names")
    p.add_argument("--k", type=int, default=50, help="precision cut-off (default 50)")
    _common(p)
    p.set_defaults(handler=run_eval_acts)


def run_index(args) -> int:
    from ahf.config import load_config
    from ahf.engine import make_engine
    from index.build import build_index
    from index.dense import DenseConfig

    config = load_config(DenseConfig, "index", args.config, args.set)
    flags = {"encoder": args.encoder, "index_type": args.index_type}
    config = DenseConfig.model_validate({**config.model_dump(), **{k: v for k, v in flags.items() if v}})
    with make_engine(args.engine, args.ray_address) as engine, progress_bar("index", enabled=not args.json) as advance:
        result = build_index(args.store, config, args.index_dir, bm25=args.only != "dense",
                             dense=args.only != "bm25", threads=args.threads, progress=advance, engine=engine)
    lines = [f"{result['turns']:,} turns indexed in {result['seconds']:.1f}s"]
    if "bm25" in result:
        b = result["bm25"]
        shards = f", {b['shards']} Lucene shards" if b["shards"] > 1 else ""
        lines.append(f"bm25: {b['docs']:,} docs ({b['docs_per_s']:,} docs/s{shards})")
    if "dense" in result:
        d = result["dense"]
        lines.append(f"dense: {d['docs']:,} docs, {d['index_type']}, {d['mode']}; encoded {d['encoded']:,} "
                     f"({d['encoded_on']}), from cache {d['cached']:,}")
        if d["recall"]:
            r = d["recall"]
            lines.append(f"dense: {d['shards']} shards; recall@10 {r['at_10']:.3f} against exact search "
                         f"({r['queries']} held-out turns, nprobe {r['nprobe']}, refine {r['refine']})")
    emit(result, args.json, "\n".join(lines))
    return 0


def run_acts_tag(args) -> int:
    from index.acts import load_acts_config, tag_acts

    from ahf.engine import make_engine

    with make_engine(args.engine, args.ray_address) as engine:
        report = tag_acts(args.store, load_acts_config(args.config, args.set), args.index_dir, engine=engine)
    counts = ", ".join(f"{a} {n:,}" for a, n in report.counts.items())
    emit(report.to_dict(), args.json, f"tagged {report.turns:,} turns: {counts}")
    return 0


def run_checkset(args) -> int:
    from index.checkset import build_checkset, write_checkset

    result = write_checkset(build_checkset(args.data, subreddit=args.subreddit), args.out)
    emit(result, args.json, f"check set in {result['dir']}: {result['labels']} (skipped {result['skipped']})")
    return 0


def run_query(args) -> int:
    from index.query import query

    hits = query(args.store, args.act, args.text, k=args.k, subreddit=args.subreddit, fusion=args.fusion,
                 index_root=args.index_dir)
    if args.json:
        import json
        import sys

        for hit in hits:  # one object per hit (JSON lines)
            sys.stdout.write(json.dumps(hit) + "\n")
        return 0
    lines = []
    for rank, hit in enumerate(hits, 1):
        reply = " ".join(hit["reply"].split())
        lines.append(f"{rank:>3}. [{hit['score']:.4f}] {hit['comment_id']} ({hit['subreddit']}): "
                     f"{reply[:160]}{'…' if len(reply) > 160 else ''}")
    emit(None, False, "\n".join(lines) or "no hits")
    return 0


def run_eval_acts(args) -> int:
    from index.evaluate import eval_acts

    result = eval_acts(args.store, args.labels, k=args.k, index_root=args.index_dir)
    lines = [f"{result['labelled_turns']:,} labelled turns ({result['labels_not_in_store']:,} labels not in store)"]
    for act, r in result["acts"].items():
        p = r[f"precision_at_{args.k}"]
        if p is None and not r["labelled"]:
            lines.append(f"{act:>12}: no labels ({r['tagged']:,} turns tagged)")
            continue
        lines.append(f"{act:>12}: precision@{args.k} {'-' if p is None else f'{p:.3f}'} "
                     f"({r['correct']}/{r['returned']}), recall "
                     f"{'-' if r['recall'] is None else format(r['recall'], '.3f')} of {r['labelled']}")
    emit(result, args.json, "\n".join(lines))
    return 0
