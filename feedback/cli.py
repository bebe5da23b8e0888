"""Verbs of the feedback stage: `label` (votes, pairs, reply sentiment) and `export` (TRL datasets)."""

from __future__ import annotations

import argparse

from ahf.console import emit, progress_bar

DEFAULT_STORE = "runs/store"


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default=DEFAULT_STORE, help=f"store directory (default: {DEFAULT_STORE})")
    parser.add_argument("--config", help="feedback config YAML (default configs/labels.yaml)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")
    parser.add_argument("--json", action="store_true", help="print one JSON object for scripts")


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("label", help="label turns: adjusted votes -> tiers, preference pairs, reply sentiment")
    _common(p)
    p.set_defaults(handler=run_label)

    p = subparsers.add_parser("export", help="write labelled turns as TRL-ready JSONL / Parquet / datasets")
    p.add_argument("--format", required=True, choices=["pairs", "pointwise", "sft"])
    p.add_argument("--act", metavar="TYPE", help="only turns tagged with this dialog act (needs `ahf acts`)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (only written inside)")
    p.add_argument("--force", action="store_true", help="replace an earlier export in DIR (atomically)")
    _common(p)
    p.set_defaults(handler=run_export)


def _config(args):
    from ahf.config import load_config
    from feedback.labels import LabelConfig

    return load_config(LabelConfig, "labels", args.config, args.set)


def run_label(args) -> int:
    from feedback.labels import label_store

    config = _config(args)
    with progress_bar("label", unit="turns", enabled=not args.json) as advance:
        report = label_store(args.store, config, progress=advance)
    r = report
    human = (f"labelled {r.labelled:,} of {r.turns:,} turns in {r.seconds:.1f} s ({r.turns_per_s:,.0f} turns/s)\n"
             f"tiers {r.tiers}; pairs {r.pairs}\n"
             f"reply sentiment: {r.replies_scored:,} replies ({r.distinct_texts:,} distinct texts) "
             f"on {r.turns_with_replies:,} turns")
    emit(report.to_dict(), args.json, human)
    return 0


def run_export(args) -> int:
    from feedback.export import export_dataset

    config = _config(args)
    report = export_dataset(args.store, args.format, args.out, act=args.act, force=args.force,
                            config=config.export)
    human = (f"exported {sum(report.rows.values()):,} {args.format} rows to {args.out}: "
             + ", ".join(f"{s} {n:,}" for s, n in report.rows.items())
             + f" (dropped {report.dropped})")
    emit(report.to_dict(), args.json, human)
    return 0
