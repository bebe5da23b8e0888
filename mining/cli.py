"""Verbs of the mining stage: `ingest`, `turns`, `stats` (`crawl` lives in mining.crawl_cli)."""

from __future__ import annotations

from rich.markup import escape

from ahf.args import add_config, add_engine, add_json, add_store
from ahf.console import emit, progress_bar


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("ingest", help="ingest dumps / API JSON / BigQuery exports into the store")
    p.add_argument("paths", nargs="+", help="files or directories")
    add_store(p)
    p.add_argument("--no-turns", action="store_true", help="skip rebuilding threads and turns afterwards")
    p.add_argument("--batch-rows", type=int, default=245_760,
                   help="rows per committed transaction, rounded down to whole DuckDB row groups (122,880)")
    p.add_argument("--store-format", choices=["duckdb", "delta"],
                   help="format of a NEW store (default: AHF_STORE_FORMAT, else delta); an existing one keeps its own")
    add_config(p, "mining")
    add_engine(p)
    add_json(p)
    p.set_defaults(handler=run_ingest)

    p = subparsers.add_parser("turns", help="rebuild threads and dialog turns from the store")
    add_store(p)
    add_config(p, "mining")
    add_engine(p)
    add_json(p)
    p.set_defaults(handler=run_turns)

    store = subparsers.add_parser("store", help="the store itself: its format")
    store_sub = store.add_subparsers(dest="store_command", metavar="WHAT", required=True)
    p = store_sub.add_parser("migrate", help="turn a DuckDB-file store into Delta Lake tables (docs/store.md)")
    add_store(p)
    add_json(p)
    p.set_defaults(handler=run_store_migrate)

    p = subparsers.add_parser("stats", help="summarise a store: threads, turns, depths, subreddits")
    add_store(p)
    add_json(p)
    p.set_defaults(handler=run_stats)


def _mining_config(args):
    from ahf.config import load_config
    from mining.turns import MiningConfig

    return load_config(MiningConfig, "mining", args.config, args.set)


def run_ingest(args) -> int:
    from mining.ingest import ingest

    import os

    from ahf.engine import make_engine

    if args.store_format:
        os.environ["AHF_STORE_FORMAT"] = args.store_format
    config = _mining_config(args)
    with make_engine(args.engine, args.ray_address) as engine, \
            progress_bar("ingest", unit="bytes", enabled=not args.json) as advance:
        report = ingest(args.paths, args.store, batch_rows=args.batch_rows, progress=advance,
                        rebuild=not args.no_turns, turn_config=config.turns, engine=engine)
    result = report.to_dict()
    lines = [f"read {report.records_read:,} records: ingested {report.ingested:,}, "
             f"skipped {sum(report.skipped.values()):,} {escape(str(report.skipped)) if report.skipped else ''}",
             f"store {args.store}: {report.store['comments']:,} comments, {report.store['posts']:,} posts, "
             f"{report.store['threads']:,} threads, {report.store['orphans']:,} orphan replies"]
    if "turns" in result:
        lines.append(f"turns: {result['turns']['turns']:,} (filtered {escape(str(result['turns']['filtered']))})")
    lines += [f"[red]error:[/red] {escape(e)}" for e in report.errors]
    emit(result, args.json, "\n".join(lines))
    return 0 if report.ok else 1


def run_turns(args) -> int:
    from mining.turns import build_turns

    from ahf.engine import make_engine

    with make_engine(args.engine, args.ray_address) as engine:
        report = build_turns(args.store, _mining_config(args).turns, engine)
    emit(report.to_dict(), args.json, f"turns: {report.turns:,} (filtered {escape(str(report.filtered))})")
    return 0


def run_store_migrate(args) -> int:
    from mining.delta_store import migrate_to_delta

    result = migrate_to_delta(args.store)
    emit(result, args.json, f"store {result['store']} is now Delta Lake tables: "
                            + ", ".join(f"{t} {n:,}" for t, n in result["tables"].items()))
    return 0


def run_stats(args) -> int:
    from mining.stats import format_stats, store_stats

    stats = store_stats(args.store)
    emit(stats, args.json, format_stats(stats))
    return 0
