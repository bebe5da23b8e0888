"""REINFORCE leave-one-out (Ahmadian et al. 2024) on DeepSpeed: `ahf train rloo PROMPTS --reward-model RM --out DIR`.

Per prompt, sample `samples_per_prompt` replies from the policy; reward = RM score - kl_coef * (log pi -
log ref); advantage = reward - the mean reward of the prompt's other samples; loss = -advantage * log pi
(reply). DATA is any rows file with a `prompt` column, or an `ahf export` directory of any format (the
prompts of its train split; the report's prompts from its validation split).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from pydantic import Field

from ahf.console import UserError
from training import data as D
from training.engine import gathered
from training.policy import PolicyCommon, PolicyTrainer, reply_logprobs, sample_replies
from training.tokens import encode_prompt


class RLOOConfig(PolicyCommon):
    """`ahf train rloo` (configs/train/rloo.yaml): the policy fields (training.policy) and these."""

    samples_per_prompt: int = Field(4, ge=2, description="replies sampled per prompt (the baseline of each is the "
                                                         "mean reward of the others)")
    kl_coef: float = Field(0.05, description="weight of the per-reply KL penalty (log pi - log ref) in the reward")


class RLOOTrainer(PolicyTrainer):
    def __init__(self, config: RLOOConfig, data_path, out_dir, reward_model: str | None, progress=None, log=None):
        if not reward_model:
            raise UserError("train rloo needs --reward-model DIR (the reward model whose score it maximises)")
        source = D.read_source(data_path, D.load_prompts, config.detokenize)
        super().__init__(config, out_dir, source, D.load_prompts, reward_model, progress, log)
        self.sampled_tokens = 0  # prompt + reply tokens of the last batch's samples

    def batches(self) -> list:
        return self.chunks(self.train_rows)

    def batch_tokens(self, batch) -> int:
        return self.sampled_tokens

    def compute_loss(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        c, tokenizer, k = self.config, self.tokenizer, self.config.samples_per_prompt
        texts = [row.prompt for row in batch]
        prompt_ids = [encode_prompt(tokenizer, p)[-c.max_prompt_length:] for p in texts]
        with gathered(self.engine.module, self.engine):
            self.engine.module.eval()
            replies = sample_replies(self.engine.module, tokenizer, prompt_ids, c, self.device, k)
            self.engine.module.train()
            expanded = [ids for ids in prompt_ids for _ in range(k)]
            logp = reply_logprobs(self.engine, expanded, replies, tokenizer.pad_token_id, self.device)
        self.sampled_tokens = sum(len(p) + len(r) for p, r in zip(expanded, replies))
        with torch.no_grad():
            ref_logp = reply_logprobs(self.reference, expanded, replies, tokenizer.pad_token_id, self.device)
            scores = self.scorer([p for p in texts for _ in range(k)],
                                 [tokenizer.decode(r, skip_special_tokens=True) for r in replies]).to(self.device)
            kl = logp.detach() - ref_logp
            reward = (scores - c.kl_coef * kl).view(-1, k)
            baseline = (reward.sum(1, keepdim=True) - reward) / (k - 1)
            advantage = (reward - baseline).view(-1)
        loss = -(advantage * logp).mean()
        return loss, {"loss": loss.item(), "reward": scores.mean().item(), "kl": kl.mean().item()}


def train_rloo(config: RLOOConfig, data_path: str | Path, out_dir: str | Path, reward_model: str,
               progress: Callable[[int], None] | None = None, log: Callable[[dict], None] | None = None) -> dict:
    """RLOO on the prompts of DATA against the reward model in `reward_model`."""
    return RLOOTrainer(config, data_path, out_dir, reward_model, progress, log).train()
