"""Arguments every verb shares, declared once: `--store`, `--config` / `--set`, `--json`, and verbs
that several stages extend (`ahf eval acts` from index, `ahf eval rm` from training)."""

from __future__ import annotations

import argparse

DEFAULT_STORE = "runs/store"  # the store of every verb that is given no --store


def add_store(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", default=DEFAULT_STORE, help=f"store directory (default: {DEFAULT_STORE})")


def add_config(parser: argparse.ArgumentParser, name: str) -> None:
    """`--config FILE` (default: configs/NAME.yaml) and repeatable `--set key=value`."""
    parser.add_argument("--config", metavar="FILE", help=f"config YAML (default: configs/{name}.yaml)")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field")


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object for scripts")


def shared_verb(subparsers, name: str, help_text: str):
    """The sub-command action of verb `name`, creating the verb if no stage has yet, so that
    several stages can add sub-commands under one verb (kept as `parser._ahf_sub`)."""
    parser = subparsers.choices.get(name) or subparsers.add_parser(name, help=help_text)
    if getattr(parser, "_ahf_sub", None) is None:  # made here, or elsewhere without the convention
        existing = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser._ahf_sub = existing[0] if existing else parser.add_subparsers(
            dest=f"{name}_command", metavar="WHAT", required=True)
    return parser._ahf_sub


def add_engine(parser: argparse.ArgumentParser) -> None:
    """`--engine local|ray` and `--ray-address` (ahf.engine)."""
    parser.add_argument("--engine", choices=["local", "ray"], default="local",
                        help="where the per-partition work runs: this process (default) or a Ray cluster")
    parser.add_argument("--ray-address", metavar="ADDR",
                        help="a running Ray cluster (auto, or ray://HOST:10001); default: start a local Ray instance")
