"""Verbs of the feedback stage: `label` (votes, pairs, reply sentiment) and `export` (TRL datasets)."""

from __future__ import annotations

import argparse

from ahf.args import add_config, add_engine, add_json, add_store
from ahf.console import emit, progress_bar


def _common(parser: argparse.ArgumentParser) -> None:
    add_store(parser)
    add_config(parser, "labels")
    add_json(parser)


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("label", help="label turns: adjusted votes -> tiers, preference pairs, reply sentiment")
    _common(p)
    add_engine(p)
    p.set_defaults(handler=run_label)

    p = subparsers.add_parser("export", help="write labelled turns as TRL-ready JSONL / Parquet / datasets")
    p.add_argument("--format", required=True, choices=["pairs", "pointwise", "sft"])
    p.add_argument("--act", metavar="TYPE", help="only turns tagged with this dialog act (needs `ahf acts`)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (only written inside)")
    p.add_argument("--force", action="store_true", help="replace an earlier export in DIR (atomically)")
    _common(p)
    add_engine(p)
    p.set_defaults(handler=run_export)


def _config(args):
    from ahf.config import load_config
    from feedback.labels import LabelConfig

    return load_config(LabelConfig, "labels", args.config, args.set)


def run_label(args) -> int:
    from feedback.labels import label_store

    from ahf.engine import make_engine

    config = _config(args)
    with make_engine(args.engine, args.ray_address) as engine, \
            progress_bar("label", unit="turns", enabled=not args.json) as advance:
        report = label_store(args.store, config, progress=advance, engine=engine)
    r = report
    human = (f"labelled {r.labelled:,} of {r.turns:,} turns in {r.seconds:.1f} s ({r.turns_per_s:,.0f} turns/s)\n"
             f"tiers {r.tiers}; pairs {r.pairs}\n"
             f"reply sentiment: {r.replies_scored:,} replies ({r.distinct_texts:,} distinct texts) "
             f"on {r.turns_with_replies:,} turns")
    either = r.sentiment_vote_agreement.get("votes", {})
    if r.pairs.get("sentiment"):
        human += (f"\nsentiment tiers {r.sentiment_tiers}; sentiment and vote pairs on the same siblings: "
                  f"{either.get('agree', 0)} of {either.get('shared', 0)} agree")
    emit(report.to_dict(), args.json, human)
    return 0


def run_export(args) -> int:
    from feedback.export import export_dataset

    from ahf.engine import make_engine

    config = _config(args)
    with make_engine(args.engine, args.ray_address) as engine:
        report = export_dataset(args.store, args.format, args.out, act=args.act, force=args.force,
                                config=config.export, engine=engine)
    human = (f"exported {sum(report.rows.values()):,} {args.format} rows to {args.out}: "
             + ", ".join(f"{s} {n:,}" for s, n in report.rows.items())
             + f" (dropped {report.dropped})")
    emit(report.to_dict(), args.json, human)
    return 0
