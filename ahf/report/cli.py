"""`ahf report`: arguments in, `ahf.report.build_report` out."""

from __future__ import annotations

from ahf.args import add_json, add_store
from ahf.console import UserError, emit


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("report", help="one self-contained HTML report: corpus, acts, votes, sentiment, "
                                             "pairs, reward models, exports")
    add_store(p)
    p.add_argument("--model", action="append", default=[], metavar="RM_DIR",
                   help="a trained model directory (repeatable): training curves, held-out and length-controlled "
                        "accuracy")
    p.add_argument("--export", action="append", default=[], metavar="DIR",
                   help="an `ahf export` directory (repeatable): its card's counts")
    p.add_argument("--pairs", metavar="FILE",
                   help="score the reward models on these pairs instead of their own held-out pairs")
    p.add_argument("--validation", metavar="FILE",
                   help="a JSON object of figures measured against a known truth (`ahf demo` writes validation.json), "
                        "shown first")
    p.add_argument("--no-store", action="store_true", help="leave the store sections out (models and exports only)")
    p.add_argument("--out", required=True, metavar="FILE", help="the HTML file to write (e.g. report.html)")
    add_json(p)
    p.set_defaults(handler=run_report)


def run_report(args) -> int:
    import json
    from pathlib import Path

    from ahf.report import build_report

    validation = None
    if args.validation:
        try:
            validation = json.loads(Path(args.validation).read_text())
        except (OSError, ValueError) as exc:
            raise UserError(f"--validation {args.validation}: {exc}") from None
        if not isinstance(validation, dict):
            raise UserError(f"--validation {args.validation}: not a JSON object")
    result = build_report(args.out, store=None if args.no_store else args.store, models=args.model,
                          exports=args.export, pairs=args.pairs, validation=validation)
    missing = [s for s in result["sections"] if s["missing"]]
    lines = [f"report: {result['out']} ({result['bytes'] / 1e6:.1f} MB, {result['figures']} figures, "
             f"{len(result['sections'])} sections)"]
    lines += [f"  {s['title']}: {s['missing']}" for s in missing]
    emit(result, args.json, "\n".join(lines))
    return 0
