"""LoRA reward models (training/lora.py): the adapters fold into the weights exactly, only they and the head
train, and the saved model is a plain reward model."""

from __future__ import annotations

import pytest
import torch

from ahf.console import UserError
from training.lora import add_lora, merged_state
from training.models import RewardModel, build_backbone

TINY = {"gpt2": {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 100, "n_positions": 64},
        "bert": {"model_type": "bert", "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2,
                 "intermediate_size": 64, "vocab_size": 100, "max_position_embeddings": 64}}


def _model(kind: str, seed: int = 0) -> RewardModel:
    torch.manual_seed(seed)
    return RewardModel(build_backbone("unused", TINY[kind], attn_implementation="sdpa"))


def _scores(model: RewardModel) -> torch.Tensor:
    model.eval()
    ids = torch.randint(0, 100, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize("kind", ["gpt2", "bert"])  # Conv1D (fan-in-fan-out) and Linear projections
def test_folded_adapters_score_as_the_adapted_model(kind):
    adapted = _model(kind)
    record = add_lora(adapted.backbone, rank=4, alpha=8, dropout=0.0, targets=None)
    with torch.no_grad():  # B starts at zero (an identity update): give it weights to fold
        for name, parameter in adapted.named_parameters():
            if ".lora_B." in name:
                parameter.normal_(std=0.5)
    state = merged_state(adapted.state_dict(), 4, 8, record["fan_in_fan_out"])
    plain = _model(kind, seed=1)
    assert set(state) == set(plain.state_dict())  # the plain model's names, no adapter left
    plain.load_state_dict(state)
    assert torch.allclose(_scores(plain), _scores(adapted), atol=1e-5)
    # the fold matters: the base weights alone score differently
    unfolded = {k.replace(".base_layer.", "."): v for k, v in adapted.state_dict().items() if ".lora_" not in k}
    plain.load_state_dict(unfolded)
    assert not torch.allclose(_scores(plain), _scores(adapted), atol=1e-3)


def test_only_the_adapters_and_the_head_train():
    model = _model("gpt2")
    record = add_lora(model.backbone, rank=2, alpha=4, dropout=0.0, targets=None)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in trainable if ".lora_" in n or n.startswith("head.")}
    assert {n for n in trainable if n.startswith("head.")} == {"head.weight", "head.bias"}
    # per layer: A is (r, 32), B is (96, r) for c_attn's 32 -> 96
    assert record["adapter_parameters"] == 2 * (2 * 32 + 96 * 2)
    assert record["target_modules"] == ["c_attn"] and record["fan_in_fan_out"]


def test_unknown_targets_are_named():
    model = _model("bert")
    with pytest.raises(UserError, match="method lora"):
        add_lora(model.backbone, rank=2, alpha=4, dropout=0.0, targets=["no_such_projection"])


def test_lora_trains_on_deepspeed_and_saves_a_plain_reward_model(tmp_path, shared_data):
    """16 real pairs, tiny GPT-2, ZeRO-2: the loss falls, the frozen weights come back unchanged, the adapted
    projections come back changed, and `ahf eval rm` reads the folder as any reward model's."""
    from training.models import load_state
    from training.rm import RMConfig, evaluate_reward_model, train_reward_model
    from training.tiny import TINY_GPT2

    pairs = shared_data / "writingprompts" / "upvote_ranked_pairs.jsonl"
    subset = tmp_path / "sixteen.jsonl"
    subset.write_text("".join(pairs.read_text().splitlines(keepends=True)[:16]))
    config = RMConfig(model="tiny", tokenizer=str(shared_data / "tokenizer" / "gpt2"), random_init=TINY_GPT2,
                      detokenize=True, max_length=48, max_prompt_length=16, eval_pairs=str(subset), epochs=20,
                      micro_batch_size=8, lr=1e-2, warmup_ratio=0.0, deepspeed="zero2", log_every=10,
                      method="lora", lora_rank=4, lora_dropout=0.0)
    result = train_reward_model(config, subset, tmp_path / "lora")
    assert result["lora"]["target_modules"] == ["c_attn"] and result["lora"]["adapter_parameters"] > 0
    assert result["history"][-1]["loss"] < result["history"][0]["loss"]
    saved = load_state(tmp_path / "lora" / "model.safetensors")
    assert not any("lora_" in key or "base_layer" in key for key in saved)
    torch.manual_seed(config.seed)
    initial = build_backbone("tiny", TINY_GPT2, attn_implementation="sdpa").state_dict()
    assert torch.equal(saved["backbone.wte.weight"], initial["wte.weight"])  # frozen
    assert torch.equal(saved["backbone.h.0.mlp.c_fc.weight"], initial["h.0.mlp.c_fc.weight"])
    assert not torch.equal(saved["backbone.h.0.attn.c_attn.weight"], initial["h.0.attn.c_attn.weight"])  # adapted
    again = evaluate_reward_model(tmp_path / "lora", subset)
    assert again["accuracy"] == result["eval"]["accuracy"] > 0.5
