"""Typed configs: one pydantic model per stage, its defaults shipped as `configs/<name>.yaml`.

The YAML files in the repository's `configs/` folder are the package `ahf.configs` of the
distribution (pyproject maps one onto the other), so a wheel install reads the same defaults as a
checkout, through `importlib.resources`. Where a file is looked up, first to last:

1. `--config FILE` (the `path` argument): that file, which must exist;
2. `AHF_CONFIG_DIR/<name>.yaml`, when the variable is set and the file is there;
3. the shipped default `ahf.configs/<name>.yaml`.

`--set key=value` overrides single fields on top. Every config model derives from `StageConfig`,
which refuses unknown keys, so a typo in a YAML file or a `--set` is an error naming the field
rather than a setting silently ignored. Each shipped YAML holds exactly its model's defaults
(tests/test_configs.py checks that), so `config=None` in a library call and a CLI run without
`--config` mean the same settings.
"""

from __future__ import annotations

import os
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from ahf.console import UserError

DEFAULTS_PACKAGE = "ahf.configs"

# Every shipped YAML and the model it holds the defaults of (module:class).
CONFIG_MODELS = {
    "mining": "mining.turns:MiningConfig",
    "crawl": "mining.crawl:CrawlConfig",
    "index": "index.dense:DenseConfig",
    "acts": "index.acts:ActsConfig",
    "labels": "feedback.labels:LabelConfig",
    "train/rm": "training.rm:RMConfig",
    "train/sft": "training.sft:SFTConfig",
    "train/dpo": "training.dpo:DPOConfig",
    "train/rloo": "training.rloo:RLOOConfig",
}


class StageConfig(BaseModel):
    """Base of every config model: unknown fields are errors, not silently ignored settings."""

    model_config = ConfigDict(extra="forbid")


M = TypeVar("M", bound=BaseModel)


def shipped(relative: str) -> Traversable:
    """A file (or folder) of the default configs shipped with the package, e.g. `deepspeed/zero2.json`."""
    node = resources.files(DEFAULTS_PACKAGE)
    for part in relative.split("/"):
        node = node / part
    return node


def find_config(relative: str) -> Path | Traversable | None:
    """`AHF_CONFIG_DIR/relative` when set and present, else the shipped default, else None."""
    user_dir = os.environ.get("AHF_CONFIG_DIR")
    if user_dir and (Path(user_dir) / relative).is_file():
        return Path(user_dir) / relative
    default = shipped(relative)
    return default if default.is_file() else None


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


def read_yaml(source: Path | Traversable) -> dict:
    """A YAML mapping; errors name the file."""
    try:
        data = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping at the top level")
    return data


def load_config(model: type[M], name: str, path: str | Path | None = None,
                overrides: list[str] | None = None) -> M:
    """Model defaults < the config file (`path`, else `find_config(name.yaml)`) < `--set` overrides."""
    if path:
        source: Path | Traversable | None = Path(path)
        if not source.is_file():
            raise UserError(f"config file not found: {source}")
    else:
        source = find_config(f"{name}.yaml")
    data = read_yaml(source) if source is not None else {}
    data = _merge(data, parse_overrides(overrides))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise UserError(f"{source or name}{' with --set' if overrides else ''}: {problems}") from exc

