"""Training on `ahf export` directories (lineage): the train split trains, the validation split evaluates,
and `ahf_model.json` records the export's manifest. Exports of a synthetic corpus, built as a user would
(generate -> ingest -> turns -> label -> export); tiny random-init GPT-2s on the real DeepSpeed engine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ahf.cli import main as ahf_main
from training import data as D
from training.tiny import TINY_GPT2


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    from feedback.export import export_dataset
    from feedback.labels import label_store
    from mining.ingest import ingest
    from mining.synthetic import SyntheticSpec, generate
    from mining.turns import build_turns

    folder = tmp_path_factory.mktemp("exports")
    corpus = generate(folder / "corpus", SyntheticSpec(posts=40))
    ingest([corpus["posts"], corpus["comments"]], folder / "store")
    build_turns(folder / "store")
    label_store(folder / "store")
    return {fmt: Path(export_dataset(folder / "store", fmt, folder / fmt).out) for fmt in ("pairs", "sft")}


def _tiny(shared_data, **extra) -> list[str]:
    settings = {"model": "tiny", "tokenizer": str(shared_data / "tokenizer" / "gpt2"),
                "random_init": json.dumps(TINY_GPT2), "max_length": 64, "max_steps": 2, "micro_batch_size": 8,
                "log_every": 1, "deepspeed": "zero0", **extra}
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


def _manifest(export) -> dict:
    return json.loads((export / ".ahf-export.json").read_text())


def _run(argv, capsys) -> dict:
    assert ahf_main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_train_rm_on_an_export_evaluates_on_its_validation_split(exports, shared_data, tmp_path, capsys):
    export = exports["pairs"]
    manifest = _manifest(export)
    rows = manifest["report"]["rows"]
    assert rows["train"] > 0 and rows["validation"] > 0
    out = tmp_path / "rm"
    result = _run(["train", "rm", str(export), "--out", str(out), *_tiny(shared_data, max_prompt_length=24)], capsys)
    assert (result["train_rows"], result["eval_rows"]) == (rows["train"], rows["validation"])  # no re-split
    assert result["eval_source"] == "validation split" and result["eval"]["pairs"] == rows["validation"]
    # exactly the validation rows: `eval rm` on the validation file gives the same figures
    assert ahf_main(["eval", "rm", "--model", str(out), "--pairs", str(export / "validation.jsonl"), "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["accuracy"] == pytest.approx(result["eval"]["accuracy"])
    assert evaluated["length_baseline"] == result["eval"]["length_baseline"]
    card = json.loads((out / "ahf_model.json").read_text())
    assert card["data"]["path"] == str(export.resolve()) and card["data"]["eval"] == "validation split"
    assert card["data"]["export"] == manifest  # report, provenance (the store), labels and export configs
    assert card["data"]["export"]["provenance"]["store"].endswith("store") and manifest["labels_config"]


def test_an_empty_validation_split_falls_back_to_held_out_prompts(exports, shared_data, tmp_path, capsys):
    export = tmp_path / "no_validation"
    shutil.copytree(exports["pairs"], export)
    manifest = _manifest(export)
    manifest["report"]["rows"]["validation"] = 0
    (export / ".ahf-export.json").write_text(json.dumps(manifest))
    (export / "validation.jsonl").write_text("")
    result = _run(["train", "rm", str(export), "--out", str(tmp_path / "rm"), *_tiny(shared_data, max_steps=1)], capsys)
    train, held = D.split_by_prompt(D.load_pairs(export / "train.jsonl"), 0.2, 0)
    assert (result["train_rows"], result["eval_rows"]) == (len(train), len(held)) and held
    assert result["eval_source"] == "20% of the training prompts (the export's validation split is empty)"


def test_sft_and_dpo_on_exports_record_their_lineage(exports, shared_data, tmp_path, capsys):
    sft = _run(["train", "sft", str(exports["sft"]), "--out", str(tmp_path / "sft"),
                *_tiny(shared_data, max_length=256, sample_max_new_tokens=4)], capsys)
    rows = _manifest(exports["sft"])["report"]["rows"]
    assert (sft["train_rows"], sft["eval_rows"], sft["eval_source"]) == (rows["train"], rows["validation"],
                                                                          "validation split")
    dpo = _run(["train", "dpo", str(exports["pairs"]), "--out", str(tmp_path / "dpo"),
                *_tiny(shared_data, micro_batch_size=2, max_new_tokens=4, eval_prompts=2)], capsys)
    rows = _manifest(exports["pairs"])["report"]["rows"]
    assert (dpo["train_rows"], dpo["eval_rows"]) == (rows["train"], rows["validation"])
    assert 0.0 <= dpo["eval_implicit_reward_accuracy"] <= 1.0
    for name, fmt in (("sft", "sft"), ("dpo", "pairs")):
        card = json.loads((tmp_path / name / "ahf_model.json").read_text())
        assert card["kind"] == "causal_lm" and card["data"]["export"]["report"]["format"] == fmt
    # a trainer refuses an export of the wrong format, naming both
    assert ahf_main(["train", "sft", str(exports["pairs"]), "--out", str(tmp_path / "x")]) == 2
    assert "a 'pairs' export; this trainer reads sft exports" in capsys.readouterr().err
