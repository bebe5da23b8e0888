"""Ensembles of reward models (`ahf merge rm --method ensemble`): the mean of the members' standardised rewards.

Weight merges (training.merge) need members fine-tuned from one base; an ensemble takes any reward models
of `ahf` (fine-tuned, LoRA, probes, different backbones), because it combines what they output, not what
they hold. Each member's reward is standardised, z = (r - mean) / std, so that a member with a wide reward
scale does not outvote the others, and the ensemble's reward is the mean of the z's.

The standardisation is fixed at merge time on `--reference PAIRS` (both replies of every pair; e.g. the
training pairs), recorded in the folder, so one reply scores the same whatever else is scored with it.
Without a reference, each scoring standardises on the replies it scores (said in the card and the result).
The folder holds only `ahf_model.json` (kind reward_model, method ensemble, the members' absolute paths):
the members stay where they are and are read from there.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ahf.console import UserError
from training.models import MODEL_CARD, read_card


def standardisation(chosen: np.ndarray, rejected: np.ndarray) -> dict:
    rewards = np.concatenate([chosen, rejected]).astype(np.float64)
    std = float(rewards.std())
    return {"mean": float(rewards.mean()), "std": std if std > 0 else 1.0}


def ensemble_rewards(member_scores: list[tuple[np.ndarray, np.ndarray]],
                     stats: list[dict] | None) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the members' z-scored rewards for chosen and rejected; `stats` per member, or None to
    standardise each member on these scores."""
    zs_chosen, zs_rejected = [], []
    for k, (chosen, rejected) in enumerate(member_scores):
        s = stats[k] if stats else standardisation(chosen, rejected)
        zs_chosen.append((np.asarray(chosen, np.float64) - s["mean"]) / s["std"])
        zs_rejected.append((np.asarray(rejected, np.float64) - s["mean"]) / s["std"])
    return np.mean(zs_chosen, axis=0), np.mean(zs_rejected, axis=0)


def _members(model_dirs: list[str]) -> list[dict]:
    cards = []
    for directory in model_dirs:
        card = read_card(Path(directory), "reward_model")
        if card.get("method") == "ensemble":
            raise UserError(f"{directory} is an ensemble itself: list its members instead")
        cards.append(card)
    tasks = {json.dumps(card.get("tasks")) for card in cards}
    if len(tasks) > 1:
        raise UserError("ensemble members must score the same tasks (all single-task, or the same task list); "
                        f"these record {sorted(tasks)}")
    return cards


def merge_ensemble(model_dirs: list[str], out_dir: str | Path, reference: str | None = None) -> dict:
    """Write the ensemble's folder; with `reference`, score every member on it to fix its standardisation."""
    from training.rm import score_reward_model

    if len(model_dirs) < 2:
        raise UserError("an ensemble needs at least two reward models")
    cards = _members(model_dirs)
    members = [str(Path(d).resolve()) for d in model_dirs]
    stats = None
    if reference:
        if cards[0].get("tasks"):
            raise UserError("--reference standardises single-task members; joint multi-task members standardise "
                            "on the scored pairs (leave --reference out)")
        stats = [standardisation(*score_reward_model(m, reference)[:2]) for m in members]
    record = {"kind": "reward_model", "method": "ensemble", "members": members, "tasks": cards[0].get("tasks"),
              "standardisation": {"source": str(reference) if reference else "scored pairs", "members": stats},
              "train_config": {"detokenize": cards[0].get("train_config", {}).get("detokenize", False)}}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MODEL_CARD).write_text(json.dumps(record, indent=2))
    return {"out_dir": str(out), **record}


def score_ensemble(model_dir: str | Path, pairs_path: str | Path, detokenize: bool | None = None,
                   task: str | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """The ensemble's rewards on a pairs file, and each member's accuracy there."""
    from training.rm import score_reward_model

    card = read_card(Path(model_dir), "reward_model")
    missing = [m for m in card["members"] if not (Path(m) / MODEL_CARD).is_file()]
    if missing:
        raise UserError(f"{model_dir}: ensemble member(s) not found: {', '.join(missing)}")
    scores = [score_reward_model(m, pairs_path, detokenize=detokenize, task=task)[:2] for m in card["members"]]
    chosen, rejected = ensemble_rewards(scores, card["standardisation"]["members"])
    members = {m: float(np.mean(np.asarray(c) > np.asarray(r))) for m, (c, r) in zip(card["members"], scores)}
    return chosen, rejected, {"members_accuracy": members, "standardised_on": card["standardisation"]["source"]}
