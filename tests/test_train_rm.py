"""Reward models on the real DeepSpeed engine (CPU, gloo, one process) with tiny random-init GPT-2s."""

from __future__ import annotations

import json

import pytest
import torch

from ahf.cli import main as ahf_main
from training import data as D
from training.engine import full_state_dict, initialize, load_deepspeed_config
from training.models import RewardModel, build_backbone
from training.rm import bt_loss, encode_pairs, evaluate_reward_model, length_baseline, pair_batches
from training.tiny import TINY_GPT2
from training.tokens import LengthPolicy


@pytest.fixture(scope="module")
def pairs_file(shared_data):
    return shared_data / "writingprompts" / "upvote_ranked_pairs.jsonl"


def _tiny_rm(seed=0):
    torch.manual_seed(seed)
    return RewardModel(build_backbone("tiny", TINY_GPT2, attn_implementation="sdpa"))


def test_packed_layouts_match_padded_scores(pairs_file, tokenizer):
    """varlen and shared-prompt packing give the same rewards as plain padding (fp32, CPU)."""
    model = _tiny_rm().eval()
    encoded, _ = encode_pairs(D.load_pairs(pairs_file, detok=True)[:12], tokenizer, LengthPolicy(96, 32))
    by_layout = {}
    for layout in ("none", "varlen", "shared_prompt"):
        scores, real = {}, 0
        for batch, _ in pair_batches(encoded, layout, 4, 400, tokenizer.pad_token_id, None):
            with torch.no_grad():
                out = model(**batch.model_inputs("cpu"))
            half = len(batch.extras["pairs"])
            for k, i in enumerate(batch.extras["pairs"]):
                scores[i] = (out[k].item(), out[half + k].item())
            real += batch.real_tokens
        by_layout[layout] = (scores, real)
    padded, _ = by_layout["none"]
    for layout in ("varlen", "shared_prompt"):
        scores, _ = by_layout[layout]
        assert scores.keys() == padded.keys()
        assert max(abs(scores[i][j] - padded[i][j]) for i in padded for j in (0, 1)) < 1e-4
    prompt_tokens = sum(len(e["prompt"]) for e in encoded)
    assert by_layout["shared_prompt"][1] == by_layout["varlen"][1] - prompt_tokens  # prompt encoded once


@pytest.mark.parametrize("stage", ["zero0", "zero1", "zero2", "zero3", "zero3_offload"])
def test_deepspeed_stages_train_and_gather(stage, pairs_file, tokenizer):
    model = _tiny_rm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    encoded, _ = encode_pairs(D.load_pairs(pairs_file, detok=True)[:4], tokenizer, LengthPolicy(48, 16))
    (batch, _), = pair_batches(encoded, "none", 4, 0, tokenizer.pad_token_id, None)
    config = load_deepspeed_config(stage, micro_batch_size=4, grad_accum=1, lr=3e-3, warmup_steps=1, total_steps=100)
    assert config["bf16"]["enabled"] is False and config["optimizer"]["params"]["torch_adam"] is True
    engine, _, _ = initialize(model, config)
    losses = []
    for _ in range(8):
        scores = engine(**batch.model_inputs(engine.device))
        loss = bt_loss(scores[:4], scores[4:])
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.5, losses
    state = full_state_dict(engine.module, engine)
    assert state.keys() == before.keys()
    assert all(state[k].shape == before[k].shape for k in before)
    assert not torch.equal(state["head.weight"], before["head.weight"])


def test_train_rm_cli_then_eval_rm(tmp_path, pairs_file, tokenizer, capsys):
    out = tmp_path / "rm"
    overrides = [f"tokenizer={tokenizer.name_or_path or ''}", "model=tiny", "detokenize=true", "max_length=64",
                 "max_prompt_length=24", "max_steps=4", "micro_batch_size=8", "lr=1e-3", "log_every=2",
                 "deepspeed=zero2", "eval_batch_size=32"]
    overrides[0] = "tokenizer=" + str(pairs_file.parents[1] / "tokenizer" / "gpt2")
    code = ahf_main(["train", "rm", str(pairs_file), "--out", str(out), "--json",
                     "--set", "random_init=" + json.dumps(TINY_GPT2), *sum([["--set", o] for o in overrides], [])])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["train_rows"] + result["eval_rows"] == 374
    assert result["eval_prompts"] == 10 and result["steps"] == 4
    assert result["length_filter"]["kept"] == result["train_rows"]  # truncated (counted), none dropped
    assert result["length_filter"]["truncated"]["reply"] > 0
    assert [h["step"] for h in result["history"]] == [2, 4]
    assert {"loss", "accuracy", "mean_margin", "tokens_per_s", "flops_per_s", "mfu"} <= result["history"][0].keys()
    assert (out / "model.safetensors").exists() and not list(out.glob("*.bin"))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[:2] == result["history"] and metrics[2]["eval"]["eval"] == result["eval"] and len(metrics) == 3
    assert result["eval_source"] == "20% of the training prompts"
    card = json.loads((out / "ahf_model.json").read_text())
    assert card["data"] == {"path": str(pairs_file.resolve()), "eval": "20% of the training prompts"}
    assert card["train_result"]["eval"] == result["eval"] and card["train_config"]["max_length"] == 64

    held_out = D.split_by_prompt(D.load_pairs(pairs_file, detok=True), 0.2, 0)[1]
    assert result["eval"]["length_baseline"] == pytest.approx(length_baseline(held_out))
    held_file = tmp_path / "held.jsonl"
    held_file.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected,
                                             "margin": float(i % 7)}) + "\n" for i, p in enumerate(held_out)))
    code = ahf_main(["eval", "rm", "--model", str(out), "--pairs", str(held_file), "--json", "--detokenize"])
    assert code == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["pairs"] == len(held_out)
    assert evaluated["accuracy"] == pytest.approx(result["eval"]["accuracy"])
    assert evaluated["mean_margin"] == pytest.approx(result["eval"]["mean_margin"], abs=1e-5)
    buckets = evaluated["by_bucket"]
    assert buckets["by"] == "margin" and sum(b["n"] for b in buckets["buckets"]) == len(held_out)


def test_rm_learns_its_training_pairs(tmp_path, pairs_file):
    """Gradients reach the weights through the engine: 16 pairs are memorised (train accuracy 1.0)."""
    from training.rm import RMConfig, train_reward_model

    subset = tmp_path / "sixteen.jsonl"
    subset.write_text("".join(pairs_file.read_text().splitlines(keepends=True)[:16]))
    config = RMConfig(model="tiny", tokenizer=str(pairs_file.parents[1] / "tokenizer" / "gpt2"),
                      random_init=TINY_GPT2, detokenize=True, max_length=48, max_prompt_length=16,
                      eval_pairs=str(subset), epochs=25, micro_batch_size=8, lr=3e-3, warmup_ratio=0.0,
                      deepspeed="zero1", log_every=10, packing="shared_prompt", pack_tokens=512)
    result = train_reward_model(config, subset, tmp_path / "memorised")
    assert result["packing"] == "shared_prompt"
    assert result["history"][-1]["loss"] < result["history"][0]["loss"]
    assert result["eval"]["accuracy"] == 1.0
    again = evaluate_reward_model(tmp_path / "memorised", subset)
    assert again["accuracy"] == 1.0


def test_tier_conditioned_reward_model(tmp_path, pairs_file):
    from training.rm import RMConfig, train_reward_model

    pairs = D.load_pairs(pairs_file)[:24]
    points = tmp_path / "tiers.jsonl"
    points.write_text("".join(json.dumps({"prompt": p.prompt, "completion": text, "tier": tier}) + "\n"
                              for p in pairs for text, tier in ((p.chosen, "good"), (p.rejected, "bad"))))
    config = RMConfig(model="tiny", tokenizer=str(pairs_file.parents[1] / "tokenizer" / "gpt2"),
                      random_init=TINY_GPT2, objective="tier", detokenize=True, max_length=48,
                      max_prompt_length=16, max_steps=3, micro_batch_size=8, lr=1e-3, deepspeed="zero0",
                      log_every=1, eval_fraction=0.25)
    result = train_reward_model(config, points, tmp_path / "tier")
    assert result["train_rows"] + result["eval_rows"] == 48
    assert 0.0 <= result["eval_tier_accuracy"] <= 1.0
    held = D.split_by_prompt(D.load_pointwise(points, detok=True), 0.25, 0)[1]
    expected = sum(sum(p.tier == 2 for p in held if p.prompt == q) * sum(p.tier == 0 for p in held if p.prompt == q)
                   for q in {p.prompt for p in held})
    assert result["eval"]["pairs"] == expected > 0  # every good x bad completion of a held-out prompt
    card = json.loads((tmp_path / "tier" / "ahf_model.json").read_text())
    assert card["head"] == "tier"
    loaded = RewardModel.load(tmp_path / "tier")
    assert loaded.head.out_features == 3


@pytest.mark.parametrize("layout", ["varlen", "shared_prompt"])
def test_block_sparse_attention_matches_the_dense_mask(layout, pairs_file, tokenizer):
    """FlexAttention on packed rows (training.attention) gives SDPA's rewards with the dense mask.
    (Forward only: FlexAttention has no backward on the CPU; training with it needs CUDA.)"""
    from training.attention import BLOCK_SPARSE

    encoded, _ = encode_pairs(D.load_pairs(pairs_file, detok=True)[:5], tokenizer, LengthPolicy(96, 32))
    dense, sparse = _tiny_rm(), _tiny_rm()
    sparse.backbone.config._attn_implementation = BLOCK_SPARSE
    build_backbone("tiny", TINY_GPT2, attn_implementation=BLOCK_SPARSE)  # registers the implementation
    (dense_batch, _), = pair_batches(encoded, layout, 0, 1024, tokenizer.pad_token_id, None)
    (sparse_batch, _), = pair_batches(encoded, layout, 0, 1024, tokenizer.pad_token_id, None, block_sparse=True)
    assert sparse_batch.input_ids.shape[1] == 1024 and sparse_batch.attention_mask is None
    assert sparse_batch.real_tokens == dense_batch.real_tokens < 1024  # padded to one shape, counted as real
    with torch.no_grad():
        expected = dense.eval()(**dense_batch.model_inputs("cpu"))
        got = sparse.eval()(**sparse_batch.model_inputs("cpu"))
    assert expected.shape == got.shape == (2 * len(encoded),)
    assert torch.allclose(expected, got, atol=1e-5)
    # without a block mask the same model attends like SDPA (padded scoring batches)
    (padded, _), = pair_batches(encoded, "none", 8, 0, tokenizer.pad_token_id, None)
    with torch.no_grad():
        assert torch.allclose(dense(**padded.model_inputs("cpu")), sparse(**padded.model_inputs("cpu")), atol=1e-5)


def test_block_sparse_training_needs_cuda(tmp_path, pairs_file):
    from ahf.console import UserError
    from training.rm import RMConfig, train_reward_model

    config = RMConfig(model="tiny", tokenizer=str(pairs_file.parents[1] / "tokenizer" / "gpt2"), random_init=TINY_GPT2,
                      packing="shared_prompt", attention="block_sparse")
    with pytest.raises(UserError, match="CUDA"):
        train_reward_model(config, pairs_file, tmp_path / "rm")


def test_eval_rm_max_length_past_the_positions_is_clamped_and_said(tmp_path, tokenizer, capsys):
    """--max-length beyond the backbone's positions scores at the position limit and reports the clamp
    (it used to be an IndexError from the position embeddings)."""
    torch.manual_seed(0)
    positions = {**TINY_GPT2, "n_positions": 64}
    model_dir = RewardModel(build_backbone("tiny", positions, attn_implementation="sdpa")).save(
        tmp_path / "rm", tokenizer, extra={"train_config": {"max_length": 48, "max_prompt_length": 16}})
    pairs = tmp_path / "long.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"prompt {i} " * 30, "chosen": "a long reply " * (40 + i),
                                         "rejected": f"short {i}"}) + "\n" for i in range(6)))
    evaluate = ["eval", "rm", "--model", str(model_dir), "--pairs", str(pairs), "--json"]
    assert ahf_main([*evaluate, "--max-length", "64"]) == 0
    at_limit = json.loads(capsys.readouterr().out)
    assert at_limit["max_length"] == 64 and "max_length_clamped" not in at_limit
    assert ahf_main([*evaluate, "--max-length", "4096"]) == 0
    clamped = json.loads(capsys.readouterr().out)
    assert clamped["max_length"] == 64 and clamped["max_length_clamped"] == {"asked": 4096, "positions": 64}
    assert clamped["mean_margin"] == at_limit["mean_margin"] and clamped["truncation"] == at_limit["truncation"]
    assert ahf_main(["eval", "rm", "--model", str(model_dir), "--pairs", str(pairs), "--max-length", "4096"]) == 0
    said = " ".join(capsys.readouterr().out.split())
    assert "max_length 4096 is past the backbone's 64 positions: scored at 64" in said
    assert ahf_main([*evaluate, "--max-length", "3"]) == 2
    assert "--max-length 3" in capsys.readouterr().err


def test_train_max_length_past_the_positions_is_a_clear_error_and_leaves_nothing(tmp_path, pairs_file, capsys):
    """A row longer than the backbone's positions would fail inside its embedding (IndexError); the trainer
    says so before it starts, and the refused run leaves no output folder."""
    subset = tmp_path / "four.jsonl"
    subset.write_text("".join(pairs_file.read_text().splitlines(keepends=True)[:4]))
    out = tmp_path / "refused"
    code = ahf_main(["train", "rm", str(subset), "--out", str(out), "--set", "model=tiny",
                     "--set", f"tokenizer={pairs_file.parents[1] / 'tokenizer' / 'gpt2'}",
                     "--set", "random_init=" + json.dumps(TINY_GPT2), "--set", "max_length=600"])
    assert code == 2 and "max_length=600 is more than the 512 positions" in capsys.readouterr().err
    assert not out.exists()
