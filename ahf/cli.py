"""The `ahf` command: one verb per stage, each a thin layer over one library function.

Each stage package registers its own verbs through `<package>/cli.py: add_commands(subparsers)`,
so this file only wires them together and turns `UserError`s into messages and exit codes.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from rich.markup import escape

from ahf import __version__
from ahf.console import UserError, stderr

# Stage modules that contribute verbs (each imports its heavy dependencies inside its handlers).
STAGES = ("mining.cli", "mining.crawl_cli", "ahf.demo", "index.cli", "feedback.cli", "training.cli",
          "ahf.report.cli", "ahf.serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ahf", description="Ambient human feedback: Reddit -> training signal")
    parser.add_argument("--version", action="version", version=f"ahf {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in STAGES:
        importlib.import_module(name).add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except UserError as exc:
        stderr.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        return exc.code
    except KeyboardInterrupt:
        stderr.print("[yellow]interrupted[/yellow]")
        return 130


if __name__ == "__main__":
    sys.exit(main())
