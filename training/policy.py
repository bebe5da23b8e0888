"""What DPO (training.dpo) and RLOO (training.rloo) share: a causal-LM policy on DeepSpeed, its frozen
reference (a copy of the starting policy), reply log-probabilities, sampling, and the before/after report.

Report, on held-out prompts, before and after training: the KL of sampled replies to the reference
(mean of log pi - log ref per reply), their mean length and, when a reward model is given, its mean
score of them. Output: a Hugging Face directory (safetensors) with `ahf_model.json` beside it.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path

import torch
from pydantic import Field

from training import data as D
from training.config import TrainCommon
from training.engine import full_state_dict, gathered
from training.loop import Trainer
from training.models import RewardModel, build_backbone, load_tokenizer, read_card, save_causal_lm
from training.rm import card_scoring, score_replies
from training.tokens import encode_prompt, pad_rows, shuffled_chunks


class PolicyCommon(TrainCommon):
    """The common fields (training.config) with a policy's defaults, and the sampling / report settings."""

    model: str = Field("gpt2-xl", description="the starting policy and its frozen reference, e.g. an "
                                              "`ahf train sft` output directory")
    micro_batch_size: int = Field(2, description="pairs (dpo) or prompts (rloo) per micro-step")
    lr: float = Field(1e-6, description="peak learning rate (linear decay to 0)")
    warmup_ratio: float = Field(0.0, description="share of the optimizer steps spent warming up")
    max_prompt_length: int = Field(128, description="prompt tokens kept (its tail for sampling; its head and last "
                                                    "token when a pair is truncated)")
    max_new_tokens: int = Field(128, description="tokens sampled per reply (rloo training, the before/after report)")
    temperature: float = Field(1.0, description="sampling temperature (no top-k / top-p: the policy's own "
                                                "distribution)")
    eval_prompts: int = Field(8, description="held-out prompts of the before/after report")
    reward_task: str | None = Field(None, description="with a jointly trained (multi-task) reward model: the task "
                                                      "whose reward scores the replies")


def reply_logprobs(model, prompts: list[list[int]], replies: list[list[int]], pad_id: int, device) -> torch.Tensor:
    """Sum of log p(reply token | prefix) per row."""
    batch = pad_rows([p + r for p, r in zip(prompts, replies)], pad_id)
    logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
    logprobs = torch.log_softmax(logits[:, :-1].float(), -1)
    targets = batch.input_ids[:, 1:].to(device)
    token_lp = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mask = torch.zeros_like(token_lp)
    for i, (p, r) in enumerate(zip(prompts, replies)):
        mask[i, len(p) - 1: len(p) - 1 + len(r)] = 1
    return (token_lp * mask).sum(-1)


class RewardScorer:
    """Scores (prompt, reply) text with a saved reward model and its own tokenizer, with the lengths and reply
    windows it was trained with (training.rm.card_scoring): the rewards `ahf eval rm` gives."""

    def __init__(self, directory: str, device, task: str | None = None):
        self.model = RewardModel.load(directory).to(device).eval()
        self.task = task  # which task of a jointly trained (multi-task) reward model scores
        self.tokenizer = load_tokenizer(directory)
        self.settings = card_scoring(read_card(directory, "reward_model"), self.model)

    def __call__(self, prompts: list[str], replies: list[str]) -> torch.Tensor:
        return score_replies(self.model, self.tokenizer, prompts, replies, batch_size=16, task=self.task,
                             **self.settings)


@torch.no_grad()
def sample_replies(model, tokenizer, prompt_ids: list[list[int]], config: PolicyCommon, device,
                   per_prompt: int) -> list[list[int]]:
    replies = []
    for ids in prompt_ids:
        inputs = torch.tensor([ids], device=device).repeat(per_prompt, 1)
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=True,
                             max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                             top_k=0, top_p=1.0, pad_token_id=tokenizer.pad_token_id)
        for row in out[:, len(ids):].tolist():
            if tokenizer.eos_token_id in row:  # keep the end token, drop what follows it
                row = row[: row.index(tokenizer.eos_token_id) + 1]
            replies.append(row or [tokenizer.eos_token_id])
    return replies


@torch.no_grad()
def sample_report(policy, reference, tokenizer, prompts: list[str], config: PolicyCommon, device,
                  scorer: RewardScorer | None) -> dict:
    """Mean RM score of sampled replies and their KL to the reference (seeded, one sample per prompt)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(config.seed + 1)
    was_training = policy.training
    policy.eval()
    prompt_ids = [encode_prompt(tokenizer, p)[-config.max_prompt_length:] for p in prompts]
    replies = sample_replies(policy, tokenizer, prompt_ids, config, device, 1)
    kl = (reply_logprobs(policy, prompt_ids, replies, tokenizer.pad_token_id, device)
          - reply_logprobs(reference, prompt_ids, replies, tokenizer.pad_token_id, device))
    report = {"prompts": len(prompts), "kl_to_reference": float(kl.mean()),
              "mean_reply_tokens": sum(map(len, replies)) / len(replies)}
    if scorer is not None:
        texts = [tokenizer.decode(r, skip_special_tokens=True) for r in replies]
        report["reward"] = float(scorer(prompts, texts).mean())
    torch.random.set_rng_state(state)
    if was_training:
        policy.train()
    return report


class PolicyTrainer(Trainer):
    """A causal-LM policy, its frozen reference and the before/after report; subclasses add data and loss."""

    def __init__(self, config: PolicyCommon, out_dir, source: D.Source, load, reward_model: str | None,
                 progress=None, log=None):
        super().__init__(config, out_dir, progress, log)
        self.train_rows, self.eval_rows = self.read(source, load)
        self.eval_prompts = sorted({r.prompt for r in self.eval_rows})[: config.eval_prompts]
        torch.manual_seed(config.seed)
        self.tokenizer = load_tokenizer(config.tokenizer or config.model)
        self.model = build_backbone(config.model, config.random_init, causal_lm=True, attn_implementation="sdpa")
        self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        if config.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.reward_model = reward_model
        self.scorer: RewardScorer | None = None
        self.rng = random.Random(config.seed)

    def chunks(self, rows: list) -> list[list]:
        """One epoch of `micro_batch_size` rows, shuffled."""
        return [[rows[i] for i in members] for members in shuffled_chunks(len(rows), self.config.micro_batch_size,
                                                                         self.rng)]

    def on_train_begin(self) -> None:
        self.reference.to(self.device)
        if self.ds_config.get("bf16", {}).get("enabled"):
            self.reference.to(torch.bfloat16)
        if self.reward_model:
            self.scorer = RewardScorer(self.reward_model, self.device, self.config.reward_task)
        self.before = self.report()

    def report(self) -> dict | None:
        if not self.eval_prompts:
            return None
        with gathered(self.engine.module, self.engine):
            return sample_report(self.engine.module, self.reference, self.tokenizer, self.eval_prompts, self.config,
                                 self.device, self.scorer)

    def evaluate(self) -> dict:
        return {"before": self.before, "after": self.report()}

    def card(self) -> dict:
        return super().card() | {"reward_model": self.reward_model}

    def save(self, directory: Path, card: dict | None = None) -> None:
        save_causal_lm(directory, full_state_dict(self.engine.module, self.engine), self.engine.module.config,
                       self.tokenizer, card)
