"""Typed configs loaded from `configs/*.yaml`, overridable from the CLI with `--set key=value`.

Each stage defines one pydantic model with defaults; `configs/<name>.yaml` mirrors those defaults
for users to edit. `load_config(Model, "name", path, overrides)` validates the merged result and
turns validation errors into a message naming the file and field.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from ahf.console import UserError

M = TypeVar("M", bound=BaseModel)

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def config_dir() -> Path:
    return Path(os.environ.get("AHF_CONFIG_DIR", REPO_CONFIGS))


def parse_overrides(pairs: list[str] | None) -> dict:
    """`["turns.min_chars=20", "tiers.by=subreddit"]` -> nested dict with YAML-typed values."""
    out: dict = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects key=value, got {pair!r}")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return out


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def load_config(model: type[M], name: str, path: str | Path | None = None,
                overrides: list[str] | None = None) -> M:
    """Defaults < `configs/<name>.yaml` (or `path`) < `--set` overrides."""
    source = Path(path) if path else config_dir() / f"{name}.yaml"
    data: dict = {}
    if source.exists():
        try:
            data = yaml.safe_load(source.read_text()) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"{source}: not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise UserError(f"{source}: expected a mapping at the top level")
    elif path:
        raise UserError(f"config file not found: {source}")
    data = _merge(data, parse_overrides(overrides))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise UserError(f"{source}: {problems}") from exc
