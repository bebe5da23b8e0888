"""`ahf demo`: the pipeline end to end on a synthetic corpus (or on real dumps with `--data`).

Each step calls the same library function a user would; the demo grows as stages land.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from ahf.console import UserError, emit, stderr

DEFAULT_OUT = "runs/demo"


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the pipeline end to end on a synthetic corpus (or --data)")
    p.add_argument("--data", nargs="+", help="real dumps / API JSON to use instead of the synthetic corpus")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"working directory (default: {DEFAULT_OUT})")
    p.add_argument("--posts", type=int, default=120, help="synthetic posts to generate")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=run_demo)


def run_demo(args) -> int:
    result = demo(args.out, data=args.data, posts=args.posts, verbose=not args.json)
    steps = result["steps"]
    summary = [f"demo {'finished' if result['ok'] else 'finished with errors'} in "
               f"{sum(s.get('seconds', 0) for s in steps.values()):.1f} s: store {result['store']}"]
    if "query acts" in steps:
        summary.append(f"  acts: {steps['query acts']['acts']}")
    summary += [f"  {name}: {steps[name]['rows']} -> {steps[name]['out']}"
                for name in steps if name.startswith("export ")]
    emit(result, args.json, "\n".join(summary))
    return 0 if result["ok"] else 1


def demo(out_dir: str | Path, data: list[str] | None = None, posts: int = 120, verbose: bool = True) -> dict:
    from mining.ingest import ingest
    from mining.stats import format_stats, store_stats
    from mining.synthetic import SyntheticSpec, generate
    from mining.turns import build_turns

    out = Path(out_dir)
    store = out / "store"
    if store.exists():
        shutil.rmtree(store)  # the demo always starts from a fresh store
    steps: dict[str, dict] = {}

    def step(name: str, fn):
        started = time.perf_counter()
        if verbose:
            stderr.print(f"[bold cyan]==> {name}[/bold cyan]")
        value = fn()
        steps[name] = {"seconds": round(time.perf_counter() - started, 3), **value}
        return value

    if data:
        inputs = data
        steps["corpus"] = {"source": "user data", "paths": list(data)}
    else:
        paths = step("generate synthetic corpus", lambda: {
            k: str(v) for k, v in generate(out / "corpus", SyntheticSpec(posts=posts)).items()})
        inputs = [paths["posts"], paths["comments"]]
    try:
        ingested = step("ingest", lambda: ingest(inputs, store).to_dict())
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from exc
    ingested.pop("files", None)
    step("threads and turns", lambda: build_turns(store).to_dict())
    stats = step("stats", lambda: store_stats(store))
    if verbose:
        stderr.print(format_stats(stats), highlight=False)
    _index_steps(step, store, verbose)
    _feedback_steps(step, store, out)
    return {"ok": not ingested["errors"], "out": str(out), "store": str(store), "steps": steps}


def _index_steps(step, store: Path, verbose: bool) -> None:
    """BM25 + dense indexes, dialog-act tags, and one query per act."""
    from collections import Counter

    from index.acts import tag_acts
    from index.build import build_index
    from index.query import query
    from mining.store import Store

    step("index (BM25 + dense)", lambda: build_index(store))
    step("tag dialog acts", lambda: tag_acts(store).to_dict())
    with Store(store, read_only=True) as s:
        counts = Counter(dict(s.con.execute("SELECT act, count(*) FROM acts GROUP BY act").fetchall()))
    hits = step("query acts", lambda: {"acts": dict(counts), "top": {
        act: query(store, act, k=3) for act in ("story", "explanation", "qa", "summary")}})
    if verbose:
        for act, rows in hits["top"].items():
            for hit in rows[:1]:
                stderr.print(f"  top {act}: {hit['reply'][:90]!r}", highlight=False)


def _feedback_steps(step, store: Path, out: Path) -> None:
    """Labels (votes, pairs, reply sentiment) and the three TRL-ready exports."""
    from feedback.export import export_dataset
    from feedback.labels import label_store

    step("label feedback", lambda: label_store(store).to_dict())
    for fmt in ("pairs", "pointwise", "sft"):
        step(f"export {fmt}", lambda fmt=fmt: export_dataset(store, fmt, out / "exports" / fmt, force=True).to_dict())
