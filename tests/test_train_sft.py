"""Behaviour cloning: prompt-masked loss, counted length drops, packing parity, checkpoints with samples."""

from __future__ import annotations

import json

import pytest
import torch

from ahf.cli import main as ahf_main
from training import data as D
from training.models import build_backbone
from training.sft import completion_loss, encode_sft, sft_batches
from training.tiny import TINY_GPT2
from training.tokens import encode_prompt, encode_reply


@pytest.fixture(scope="module")
def stories(shared_data):
    return D.load_sft(shared_data / "writingprompts" / "fan2018_500.csv", detok=True)


def test_over_length_rows_are_dropped_and_counted_never_cut(stories, tokenizer):
    lengths = [len(encode_prompt(tokenizer, s.prompt)) + len(encode_reply(tokenizer, s.completion)) for s in stories]
    encoded, report = encode_sft(stories, tokenizer, 512)
    over = sum(n > 512 for n in lengths)
    assert 0 < over < len(stories)
    assert report.to_dict() == {"total": 501, "kept": 501 - over, "dropped": {"over_max_length_512": over},
                                "truncated": {}}
    assert sorted(len(e["ids"]) for e in encoded) == sorted(n for n in lengths if n <= 512)


def test_loss_is_on_the_completion_only(stories, tokenizer):
    torch.manual_seed(0)
    model = build_backbone("tiny", TINY_GPT2, causal_lm=True, attn_implementation="sdpa").eval()
    short = [D.SFTExample(s.prompt, " ".join(s.completion.split()[: 20 + i])) for i, s in enumerate(stories[:12])]
    encoded, report = encode_sft(short, tokenizer, 160)
    assert report.kept == 12
    n_prompt = len(encode_prompt(tokenizer, short[0].prompt))
    first = encoded[0]
    assert first["labels"][:n_prompt] == [-100] * n_prompt and -100 not in first["labels"][n_prompt:]
    assert first["labels"][-1] == tokenizer.eos_token_id  # the model learns to stop
    padded = sft_batches(encoded, "none", 4, 0, tokenizer.pad_token_id, None)
    packed = sft_batches(encoded, "varlen", 4, 512, tokenizer.pad_token_id, None)
    with torch.no_grad():
        def total(batches):
            loss_sum, count = 0.0, 0
            for batch, labels in batches:
                inputs = batch.model_inputs("cpu")
                inputs.pop("score_index", None)
                loss, n = completion_loss(model(**inputs).logits, labels)
                loss_sum, count = loss_sum + loss.item() * n, count + n
            return loss_sum / count, count
        padded_loss, padded_count = total(padded)
        packed_loss, packed_count = total(packed)
        # transformers' own shifted loss with the same labels agrees on one padded batch
        batch, labels = padded[0]
        reference = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          labels=labels).loss.item()
        ours, _ = completion_loss(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, labels)
    assert padded_count == packed_count == sum(sum(t != -100 for t in e["labels"][1:]) for e in encoded)
    assert packed_loss == pytest.approx(padded_loss, rel=1e-5)
    assert ours.item() == pytest.approx(reference, rel=1e-5)


def test_train_sft_cli_writes_checkpoints_with_samples(tmp_path, shared_data, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "sft"
    code = ahf_main(["train", "sft", str(shared_data / "writingprompts" / "fan2018_500.csv"), "--out", str(out),
                     "--json", "--set", "model=tiny", "--set", f"tokenizer={shared_data / 'tokenizer' / 'gpt2'}",
                     "--set", "random_init=" + json.dumps(TINY_GPT2), "--set", "detokenize=true",
                     "--set", "max_length=256", "--set", "max_steps=4", "--set", "save_every=2",
                     "--set", "micro_batch_size=4", "--set", "lr=1e-3", "--set", "log_every=1",
                     "--set", "deepspeed=zero3", "--set", "eval_fraction=0.1", "--set", "sample_max_new_tokens=8"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 4 and [h["step"] for h in result["history"]] == [1, 2, 3, 4]
    assert result["length_filter"]["kept"] + sum(result["length_filter"]["dropped"].values()) == result["train_rows"]
    assert result["train_rows"] + result["eval_rows"] == 501
    assert [c["step"] for c in result["checkpoints"]] == [2, 4]
    for step in (2, 4):
        samples = [json.loads(line) for line in (out / f"checkpoint-{step}" / "samples.jsonl").read_text().splitlines()]
        assert len(samples) == 2 and all(s["step"] == step and s["completion"] for s in samples)
        assert (out / f"checkpoint-{step}" / "model.safetensors").exists()
    assert result["eval_loss"] == pytest.approx(result["checkpoints"][-1]["eval_loss"]) and result["eval_loss"] < 12
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.n_layer == 2
