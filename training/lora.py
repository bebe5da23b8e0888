"""LoRA for reward models (`ahf train rm --set method=lora`), through `peft`.

Low-rank adapters go into the backbone's attention projections (peft's `inject_adapter_in_model`, so the
module tree keeps its names); the backbone's own weights are frozen and only the adapters and the reward
head train, under the same DeepSpeed loop as full fine-tuning. At save time the adapters are folded into
the weights they adapt, W + (alpha / r) * B @ A, computed on the gathered state dict (so ZeRO-3 works):
the saved model is a plain reward model that `ahf eval rm`, `ahf merge rm` and `RewardModel.load` read
as they read a fine-tuned one, with no peft needed to use it.
"""

from __future__ import annotations

import re

import torch

from ahf.console import UserError

# peft's own defaults per architecture, for the backbones ahf meets; others name theirs in lora_target_modules
DEFAULT_TARGETS = {"gpt2": ["c_attn"], "bert": ["query", "value"], "roberta": ["query", "value"],
                   "distilbert": ["q_lin", "v_lin"], "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"],
                   "qwen2": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"]}
# GPT-2's Conv1D stores its weight as (in, out): the low-rank update is transposed for it
FAN_IN_FAN_OUT = {"gpt2"}
ADAPTER = "default"


def lora_targets(model_type: str, configured: list[str] | None) -> list[str]:
    if configured:
        return configured
    if model_type not in DEFAULT_TARGETS:
        raise UserError(f"method lora: no default target modules for a {model_type!r} backbone; name them with "
                        f"--set lora_target_modules=[...] (e.g. its attention projections)")
    return DEFAULT_TARGETS[model_type]


def add_lora(backbone: torch.nn.Module, rank: int, alpha: float, dropout: float,
             targets: list[str] | None) -> dict:
    """Put adapters into `backbone` in place and freeze everything else in it; returns what was done."""
    from peft import LoraConfig, inject_adapter_in_model

    model_type = backbone.config.model_type
    modules = lora_targets(model_type, targets)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules,
                        fan_in_fan_out=model_type in FAN_IN_FAN_OUT, bias="none")
    try:
        inject_adapter_in_model(config, backbone, adapter_name=ADAPTER)
    except ValueError as exc:  # peft names the modules it could not find
        raise UserError(f"method lora: {exc}") from None
    for name, parameter in backbone.named_parameters():
        parameter.requires_grad = ".lora_" in name
    adapters = sum(p.numel() for n, p in backbone.named_parameters() if ".lora_" in n)
    return {"rank": rank, "alpha": alpha, "dropout": dropout, "target_modules": modules,
            "adapter_parameters": adapters, "fan_in_fan_out": model_type in FAN_IN_FAN_OUT}


_LORA_A = re.compile(rf"^(?P<module>.+)\.lora_A\.{ADAPTER}\.weight$")


def merged_state(state: dict[str, torch.Tensor], rank: int, alpha: float,
                 fan_in_fan_out: bool) -> dict[str, torch.Tensor]:
    """The state dict of the plain model: each adapted weight becomes W + (alpha / r) B @ A and the adapter
    tensors go; `<module>.base_layer.<param>` is named `<module>.<param>` again."""
    scaling = alpha / rank
    merged = {key: value for key, value in state.items() if ".lora_" not in key}
    for key in state:
        match = _LORA_A.match(key)
        if not match:
            continue
        module = match["module"]
        delta = state[f"{module}.lora_B.{ADAPTER}.weight"].float() @ state[key].float() * scaling
        weight = f"{module}.base_layer.weight"
        merged[weight] = merged[weight] + (delta.T if fan_in_fan_out else delta).to(merged[weight].dtype)
    return {key.replace(".base_layer.", "."): value for key, value in merged.items()}
