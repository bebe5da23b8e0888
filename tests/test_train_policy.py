"""Policy optimisation: the DPO loss against its formula, and DPO / RLOO runs on the real engine."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ahf.cli import main as ahf_main
from training.models import RewardModel, build_backbone
from training.dpo import dpo_loss
from training.policy import reply_logprobs
from training.tiny import TINY_GPT2


@pytest.fixture(scope="module")
def small_pairs(shared_data, tmp_path_factory):
    """The first 16 real pairs (4 prompts) so that the runs stay a few seconds long."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    lines = (shared_data / "writingprompts" / "upvote_ranked_pairs.jsonl").read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:16]))
    return path


def test_dpo_loss_formula():
    loss, logits = dpo_loss(torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]),
                            torch.tensor([-11.5]), beta=0.1)
    assert logits.item() == pytest.approx(0.1 * ((-10 + 11) - (-12 + 11.5)))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.15)))


def test_reply_logprobs_sum_only_reply_tokens(tokenizer):
    torch.manual_seed(0)
    model = build_backbone("tiny", TINY_GPT2, causal_lm=True, attn_implementation="sdpa").eval()
    prompt, reply = tokenizer.encode("Once upon"), tokenizer.encode(" a time there was")
    with torch.no_grad():
        ours = reply_logprobs(model, [prompt, prompt[:1]], [reply, reply], tokenizer.pad_token_id, "cpu")
        logits = model(torch.tensor([prompt + reply])).logits[0]
        manual = sum(torch.log_softmax(logits[len(prompt) - 1 + i], -1)[t] for i, t in enumerate(reply))
    assert ours[0].item() == pytest.approx(manual.item(), rel=1e-5)
    assert ours[1].item() != pytest.approx(ours[0].item())  # a different prompt conditions differently


def _reward_model(tmp_path, tokenizer):
    torch.manual_seed(3)
    return RewardModel(build_backbone("tiny", TINY_GPT2, attn_implementation="sdpa")).save(
        tmp_path / "rm", tokenizer, extra={"train_config": {"max_length": 64}})


LOGGED = {"step", "micro_step", "loss", "lr", "tokens_per_s", "flops_per_s", "mfu"}


@pytest.mark.parametrize("algorithm", ["dpo", "rloo"])
def test_train_policy_cli_reports_reward_and_kl(algorithm, tmp_path, small_pairs, tokenizer, shared_data, capsys):
    rm_dir = _reward_model(tmp_path, tokenizer)
    out = tmp_path / algorithm
    settings = {"model": "tiny", "tokenizer": str(shared_data / "tokenizer" / "gpt2"),
                "random_init": json.dumps(TINY_GPT2), "detokenize": "true", "max_length": 64,
                "max_prompt_length": 24, "max_steps": 3, "micro_batch_size": 2, "lr": 1e-2, "log_every": 1,
                "max_new_tokens": 6, "eval_prompts": 1, "eval_fraction": 0.25, "deepspeed": "zero2"}
    if algorithm == "rloo":
        settings["samples_per_prompt"] = 2
    argv = ["train", algorithm, str(small_pairs), "--out", str(out), "--reward-model", str(rm_dir), "--json"]
    for key, value in settings.items():
        argv += ["--set", f"{key}={value}"]
    assert ahf_main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 3 and len(result["history"]) == 3
    before, after = result["before"], result["after"]
    assert before["kl_to_reference"] == 0.0  # the policy starts as the reference
    assert after["kl_to_reference"] != 0.0  # and three high-lr steps move it
    assert math.isfinite(before["reward"]) and math.isfinite(after["reward"])
    stats = {"accuracy", "mean_margin"} if algorithm == "dpo" else {"reward", "kl"}
    if algorithm == "dpo":
        from training import data as D

        train, held = D.split_by_prompt(D.load_pairs(small_pairs, detok=True), 0.25, 0)
        assert (result["train_rows"], result["eval_rows"]) == (len(train), len(held)) == (13, 3)
        assert 0.0 <= result["eval_implicit_reward_accuracy"] <= 1.0
    else:
        assert result["train_rows"] == 3 and result["eval_rows"] == 1  # 4 distinct prompts
    # metrics.jsonl: one line per logged step (every step here), then the before/after evaluation
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[:3] == result["history"] and [line["step"] for line in lines[:3]] == [1, 2, 3]
    assert all(LOGGED | stats <= line.keys() and line["tokens_per_s"] > 0 and line["mfu"] is None
               for line in lines[:3])  # no peak FLOPs known on the CPU: achieved flops/s only
    assert lines[3] == {"eval": {k: result[k] for k in lines[3]["eval"]}} and "after" in lines[3]["eval"]
    assert len(lines) == 4
    card = json.loads((out / "ahf_model.json").read_text())
    assert card["kind"] == "causal_lm" and card["reward_model"] == str(rm_dir)
    assert card["data"] == {"path": str(small_pairs.resolve()), "eval": "25% of the training prompts"}
    assert (out / "model.safetensors").exists()


def test_rloo_requires_a_reward_model(tmp_path, small_pairs, capsys):
    assert ahf_main(["train", "rloo", str(small_pairs), "--out", str(tmp_path / "x")]) == 2
    assert "needs --reward-model" in capsys.readouterr().err
    assert ahf_main(["train", "rloo", str(small_pairs), "--out", str(tmp_path / "x"),
                     "--set", "samples_per_prompt=1"]) == 2  # the leave-one-out baseline needs two samples
    assert "samples_per_prompt" in capsys.readouterr().err
