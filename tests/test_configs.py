"""Configs mean one thing: each shipped YAML is exactly its model's defaults, lists every field,
and an unknown key is an error that names it."""

from __future__ import annotations

import importlib

import pytest
from pydantic import BaseModel

from ahf.config import CONFIG_MODELS, find_config, load_config, read_yaml, shipped
from ahf.console import UserError

# Fields that are data, not settings: the model has no default for them, the YAML defines them.
DATA_FIELDS = {"acts": {"acts"}}


def _model(name: str) -> type[BaseModel]:
    module, _, cls = CONFIG_MODELS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def _keys(model: type[BaseModel], data: dict, where: str) -> list[str]:
    """Fields of `model` (recursively through nested configs) that `data` leaves out."""
    missing = []
    for name, field in model.model_fields.items():
        if name not in data:
            missing.append(f"{where}{name}")
        elif isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel) \
                and isinstance(data[name], dict):
            missing += _keys(field.annotation, data[name], f"{where}{name}.")
    return missing


@pytest.mark.parametrize("name", sorted(CONFIG_MODELS))
def test_shipped_yaml_is_the_model_defaults(name):
    model = _model(name)
    data = read_yaml(shipped(f"{name}.yaml"))
    loaded = model.model_validate(data).model_dump(mode="json")
    data_fields = DATA_FIELDS.get(name, set())
    defaults = model.model_construct().model_dump(mode="json", exclude=data_fields)
    assert {k: v for k, v in loaded.items() if k not in data_fields} == defaults
    assert _keys(model, data, "") == []  # the YAML shows every setting a user can change


@pytest.mark.parametrize("name", sorted(CONFIG_MODELS))
def test_unknown_keys_are_errors_naming_the_field(name):
    with pytest.raises(UserError, match=rf"{name}\.yaml with --set: colour: Extra inputs are not permitted"):
        load_config(_model(name), name, overrides=["colour=1"])


def test_a_typo_in_a_users_file_names_the_file_and_field(tmp_path):
    from feedback.labels import LabelConfig

    path = tmp_path / "mine.yaml"
    path.write_text("votes:\n  w_rnak: 2\n")
    with pytest.raises(UserError, match=r"mine\.yaml: votes\.w_rnak: Extra inputs are not permitted"):
        load_config(LabelConfig, "labels", path)


def test_a_nested_typo_is_named(tmp_path):
    from feedback.labels import LabelConfig

    with pytest.raises(UserError, match=r"labels\.yaml with --set: votes\.w_rnak: Extra inputs"):
        load_config(LabelConfig, "labels", overrides=["votes.w_rnak=2"])


def test_user_config_dir_overrides_a_file_and_falls_back_for_the_others(tmp_path, monkeypatch):
    from feedback.labels import LabelConfig
    from mining.turns import MiningConfig

    (tmp_path / "mining.yaml").write_text("turns: {min_chars: 40}\n")
    monkeypatch.setenv("AHF_CONFIG_DIR", str(tmp_path))
    assert find_config("mining.yaml") == tmp_path / "mining.yaml"
    assert load_config(MiningConfig, "mining").turns.min_chars == 40
    assert load_config(LabelConfig, "labels") == LabelConfig()  # not in the folder: the shipped default
    assert find_config("deepspeed/zero2.json") == shipped("deepspeed/zero2.json")


def test_config_none_means_the_yaml_everywhere(tmp_path, monkeypatch, shared_data):
    """A library call given no config reads the YAML (here a user's folder), as the CLI does."""
    from mining.ingest import ingest

    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "mining.yaml").write_text("turns: {min_chars: 400}\n")
    monkeypatch.setenv("AHF_CONFIG_DIR", str(tmp_path / "conf"))
    report = ingest([shared_data / "pushshift" / "RC_2005-12.zst"], tmp_path / "store")
    assert report.turns.filtered["too_short"] > 500  # 3 with the shipped min_chars of 5


def _undocumented(model: type[BaseModel], seen: set) -> list[str]:
    """Fields with neither a description nor an entry in their class docstring, through nested configs."""
    if model in seen:
        return []
    seen.add(model)
    missing = []
    for name, field in model.model_fields.items():
        doc = model.__doc__ or ""
        if not field.description and f"`{name}`" not in doc and f"{name}:" not in doc:
            missing.append(f"{model.__name__}.{name}")
        for inner in (field.annotation, *getattr(field.annotation, "__args__", ())):
            for candidate in (inner, *getattr(inner, "__args__", ())):
                if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                    missing += _undocumented(candidate, seen)
    return missing


@pytest.mark.parametrize("name", sorted(CONFIG_MODELS))
def test_every_setting_is_documented_where_it_is_declared(name):
    assert _undocumented(_model(name), set()) == []
