"""Direct preference optimisation (Rafailov et al. 2023) on DeepSpeed: `ahf train dpo PAIRS --out DIR`.

loss = -log sigmoid(beta * [(log pi(c) - log ref(c)) - (log pi(r) - log ref(r))]), log-probabilities summed
over the reply tokens; the reference is a frozen copy of the starting policy (training.policy). DATA is a
pairs file (`prompt, chosen, rejected`) or an `ahf export --format pairs` directory (train split; the
report and the held-out implicit-reward accuracy on its validation split). Pairs over `max_length` are
truncated and counted (`length_filter`), as for reward models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from pydantic import Field

from ahf.console import UserError
from training import data as D
from training.engine import gathered
from training.policy import PolicyCommon, PolicyTrainer, reply_logprobs
from training.rm import encode_pairs
from training.tokens import LengthPolicy


class DPOConfig(PolicyCommon):
    """`ahf train dpo` (configs/train/dpo.yaml): the policy fields (training.policy) and `beta`."""

    beta: float = Field(0.1, description="β: scale of the implicit reward; larger keeps the policy nearer the "
                                         "reference")


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float):
    logits = beta * ((pi_chosen - ref_chosen) - (pi_rejected - ref_rejected))
    return -F.logsigmoid(logits).mean(), logits


def pair_logprobs(model, rows: list[dict], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(chosen | prompt) and log p(rejected | its prompt) of encoded pairs (training.rm.encode_pairs)."""
    both = reply_logprobs(model, [e["prompt"] for e in rows] + [e["rejected_prompt"] for e in rows],
                          [e["chosen"] for e in rows] + [e["rejected"] for e in rows], pad_id, device)
    return both[: len(rows)], both[len(rows):]


class DPOTrainer(PolicyTrainer):
    def __init__(self, config: DPOConfig, data_path, out_dir, reward_model: str | None = None, progress=None,
                 log=None):
        source = D.read_source(data_path, D.load_pairs, config.detokenize, ("pairs",))
        super().__init__(config, out_dir, source, D.load_pairs, reward_model, progress, log)
        self.length = LengthPolicy(config.max_length, config.max_prompt_length, "truncate")
        self.encoded, filtering = encode_pairs(self.train_rows, self.tokenizer, self.length)
        self.facts["length_filter"] = filtering.to_dict()
        if not self.encoded:
            raise UserError(f"{data_path}: no pairs left after length filtering {filtering.to_dict()}")

    def batches(self) -> list:
        return self.chunks(self.encoded)

    def batch_tokens(self, batch) -> int:
        return sum(len(e["prompt"]) + len(e["chosen"]) + len(e["rejected_prompt"]) + len(e["rejected"]) for e in batch)

    def compute_loss(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        pad, beta = self.tokenizer.pad_token_id, self.config.beta
        chosen, rejected = pair_logprobs(self.engine, batch, pad, self.device)
        with torch.no_grad():
            ref_chosen, ref_rejected = pair_logprobs(self.reference, batch, pad, self.device)
        loss, logits = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)
        return loss, {"loss": loss.item(), "accuracy": (logits > 0).float().mean().item(),
                      "mean_margin": (logits / beta).mean().item()}

    def evaluate(self) -> dict:
        result = super().evaluate()
        if self.eval_rows:
            result["eval_implicit_reward_accuracy"] = self.implicit_reward_accuracy(self.eval_rows)
        return result

    @torch.no_grad()
    def implicit_reward_accuracy(self, pairs: list[D.Pair], batch_size: int = 8) -> float:
        """Share of pairs whose chosen reply gains more log-probability over the reference than the rejected."""
        encoded, _ = encode_pairs(pairs, self.tokenizer, self.length)
        pad, hits = self.tokenizer.pad_token_id, 0
        with gathered(self.engine.module, self.engine):
            policy = self.engine.module.eval()
            for start in range(0, len(encoded), batch_size):
                rows = encoded[start:start + batch_size]
                chosen, rejected = pair_logprobs(policy, rows, pad, self.device)
                ref_chosen, ref_rejected = pair_logprobs(self.reference, rows, pad, self.device)
                hits += int(((chosen - ref_chosen) - (rejected - ref_rejected) > 0).sum())
        return hits / max(1, len(encoded))


def train_dpo(config: DPOConfig, data_path: str | Path, out_dir: str | Path, reward_model: str | None = None,
              progress: Callable[[int], None] | None = None, log: Callable[[dict], None] | None = None) -> dict:
    """DPO on DATA; `reward_model` (optional) scores the before/after report's sampled replies."""
    return DPOTrainer(config, data_path, out_dir, reward_model, progress, log).train()
