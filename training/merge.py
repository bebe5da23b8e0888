"""Merging reward models fine-tuned from one base: average, task arithmetic, TIES.

- average: the element-wise mean of the models.
- task-arithmetic: base + scale * sum_i (model_i - base)   (Ilharco et al. 2023).
- ties: per tensor, keep each task vector's top `density` fraction by magnitude, elect a sign per
  element by the summed trimmed vectors, and average only the entries that agree with it
  (Yadav et al. 2023); base + scale * that.

The backbone is merged with the chosen method. The scoring heads start from random init and have no
base to subtract, so they are averaged under every method (the record says so). The base is the
models' recorded `base_model` (a from_pretrained name or path) unless `base` names one.

Joint multi-task models (training.multitask) merge only with models conditioned the same way on the
same task list (per-task heads are averaged column by column); anything else is refused by name,
since a single-task head and a per-task head score different things even where the shapes agree.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ahf.console import UserError
from ahf.model_folders import SAFE_LOADING, check_model_folder
from training.models import MODEL_CARD, NO_NETWORK_METHODS, WEIGHTS, RewardModel, load_state, load_tokenizer, read_card


def _base_backbone_state(base: str) -> dict[str, torch.Tensor]:
    path = Path(base)
    if (path / MODEL_CARD).exists():  # another ahf reward model used as the base
        return {k: v for k, v in load_state(path / WEIGHTS).items() if k.startswith("backbone.")}
    from transformers import AutoModel

    check_model_folder(base)
    try:
        backbone = AutoModel.from_pretrained(base, **SAFE_LOADING)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the base model {base!r}: {exc}") from exc
    return {f"backbone.{k}": v.float() for k, v in backbone.state_dict().items()}


def ties(deltas: list[torch.Tensor], density: float) -> torch.Tensor:
    trimmed = []
    for delta in deltas:
        keep = max(1, int(round(density * delta.numel())))
        threshold = delta.abs().flatten().kthvalue(delta.numel() - keep + 1).values
        trimmed.append(torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta)))
    stacked = torch.stack(trimmed)
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    return (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)


def merge_states(states: list[dict[str, torch.Tensor]], method: str, base: dict[str, torch.Tensor] | None,
                 scale: float = 1.0, density: float = 0.2) -> dict[str, torch.Tensor]:
    merged = {}
    for key in states[0]:
        tensors = [s[key].float() for s in states]
        if not tensors[0].is_floating_point() or method == "average" or key not in (base or {}):
            merged[key] = torch.stack(tensors).mean(0) if tensors[0].is_floating_point() else states[0][key]
            continue
        origin = base[key].float()
        if origin.shape != tensors[0].shape:
            raise UserError(f"base model tensor {key} has shape {tuple(origin.shape)}, the models {tuple(tensors[0].shape)}")
        deltas = [t - origin for t in tensors]
        if method == "task-arithmetic":
            merged[key] = origin + scale * torch.stack(deltas).sum(0)
        elif method == "ties":
            merged[key] = origin + scale * ties(deltas, density)
        else:
            raise UserError(f"unknown merge method {method!r}")
    return merged


def _conditioning(card: dict) -> str:
    tasks = card.get("tasks")
    return f"{card.get('task_conditioning')} over tasks [{', '.join(tasks)}]" if tasks else "single-task"


def merge_reward_models(model_dirs: list[str], out_dir: str | Path, method: str = "average",
                        base: str | None = None, scale: float = 1.0, density: float = 0.2) -> dict:
    if len(model_dirs) < 2:
        raise UserError("merging needs at least two reward models")
    cards = [read_card(Path(d), "reward_model") for d in model_dirs]
    for directory, card in zip(model_dirs, cards):
        if card.get("method") in NO_NETWORK_METHODS:
            raise UserError(f"{directory} is a {card['method']} reward model: it has no weights to merge; combine "
                            "it with --method ensemble")
    for directory, card in zip(model_dirs[1:], cards[1:]):
        if card["backbone_config"].get("model_type") != cards[0]["backbone_config"].get("model_type") \
                or card["head"] != cards[0]["head"]:
            raise UserError(f"{directory}: a different architecture or head than {model_dirs[0]}; cannot merge")
        if _conditioning(card) != _conditioning(cards[0]):
            raise UserError(f"{directory} is {_conditioning(card)}, {model_dirs[0]} is {_conditioning(cards[0])}: "
                            "reward models merge only with the same task conditioning and task list")
    states = [load_state(Path(d) / WEIGHTS) for d in model_dirs]
    for directory, state in zip(model_dirs[1:], states[1:]):
        if state.keys() != states[0].keys() or any(state[k].shape != states[0][k].shape for k in state):
            raise UserError(f"{directory}: tensors differ from {model_dirs[0]} (names or shapes); cannot merge")
    base_state = None
    if method != "average":
        base = base or cards[0].get("base_model")
        if not base:
            raise UserError(f"--method {method} needs the shared base model (--base): the models record none")
        base_state = _base_backbone_state(base)
    merged = merge_states(states, method, base_state, scale, density)
    from_base = sum(1 for k in states[0] if k in (base_state or {}))
    if method != "average" and from_base == 0:
        raise UserError(f"the base model {base!r} shares no tensor names with the reward models' backbones")
    model = RewardModel.load(model_dirs[0])
    model.load_state_dict(merged, strict=False)
    record = {"merged_from": [str(d) for d in model_dirs], "method": method, "base": base, "scale": scale,
              "density": density if method == "ties" else None, "heads": "averaged",
              "tensors": len(states[0]), "tensors_merged_against_base": from_base,
              "train_config": cards[0].get("train_config", {})}
    model.save(out_dir, load_tokenizer(str(model_dirs[0])), extra=record, state_dict=merged)
    return {"out_dir": str(out_dir), **record}
