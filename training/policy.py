"""Policy optimisation on DeepSpeed: DPO from preference pairs, and RLOO against a reward model with a KL penalty.

- dpo (Rafailov et al. 2023): loss = -log sigmoid(beta * [(log pi(c) - log ref(c)) - (log pi(r) - log ref(r))]),
  log-probabilities summed over the reply tokens; the reference is a frozen copy of the starting policy.
  Input: pairs (prompt, chosen, rejected).
- rloo (Ahmadian et al. 2024, REINFORCE leave-one-out): per prompt, sample `samples_per_prompt` replies,
  reward = RM score - kl_coef * (log pi - log ref), advantage = reward - mean of the other samples'
  rewards, loss = -advantage * log pi(reply). Input: any file with a `prompt` column + `--reward-model`.

Both report, on held-out prompts, the reward model's mean score of sampled replies and their KL to the
reference (mean of log pi - log ref per reply), before and after training, when a reward model is given;
DPO also reports held-out implicit-reward accuracy. Output: a Hugging Face directory (safetensors).
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from pydantic import Field

from ahf.console import UserError
from training import data as D
from training.config import TrainCommon
from training.engine import full_state_dict, gathered, start_engine
from training.models import RewardModel, build_backbone, load_tokenizer
from training.sft import save_causal_lm
from training.tokens import LengthPolicy, encode_prompt, encode_reply, pad_rows


class PolicyConfig(TrainCommon):
    """`ahf train policy` (configs/train/policy.yaml); `model` is the starting policy, e.g. an SFT output."""

    algorithm: str = Field("dpo", pattern="^(dpo|rloo)$")
    max_prompt_length: int = 128
    micro_batch_size: int = 2  # pairs (dpo) or prompts (rloo) per step
    lr: float = 1e-6
    warmup_ratio: float = 0.0
    beta: float = 0.1  # dpo
    samples_per_prompt: int = 4  # rloo
    kl_coef: float = 0.05  # rloo
    max_new_tokens: int = 128
    temperature: float = 1.0
    eval_prompts: int = 8  # held-out prompts for the before/after report
    reward_task: str | None = None  # rloo with a multi-task reward model: the task whose reward to optimise


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


def dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta: float):
    logits = beta * ((pi_chosen - ref_chosen) - (pi_rejected - ref_rejected))
    return -F.logsigmoid(logits).mean(), logits


class RewardScorer:
    """Scores (prompt, reply) text with a saved reward model and its own tokenizer."""

    def __init__(self, directory: str, device, task: str | None = None):
        self.model = RewardModel.load(directory).to(device).eval()
        self.task = task  # which task of a jointly trained (multi-task) reward model scores
        self.tokenizer = load_tokenizer(directory)
        card = json.loads((Path(directory) / "ahf_model.json").read_text())
        self.max_length = card.get("train_config", {}).get("max_length", 512)
        self.device = device

    @torch.no_grad()
    def __call__(self, prompts: list[str], replies: list[str]) -> torch.Tensor:
        from training.rm import score_pairs

        pairs = [D.Pair(p, r, r) for p, r in zip(prompts, replies)]
        chosen, _, _ = score_pairs(self.model, self.tokenizer, pairs, self.max_length, batch_size=16, task=self.task)
        return chosen


@torch.no_grad()
def sample_replies(model, tokenizer, prompt_ids: list[list[int]], config: PolicyConfig, device,
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
def sample_report(policy, reference, tokenizer, prompts: list[str], config: PolicyConfig, device,
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


def train_policy(config: PolicyConfig, data_path: str | Path, out_dir: str | Path, reward_model: str | None = None,
                 progress: Callable[[int], None] | None = None, log: Callable[[dict], None] | None = None) -> dict:
    if config.algorithm == "rloo" and not reward_model:
        raise UserError("algorithm=rloo needs --reward-model DIR")
    torch.manual_seed(config.seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(config.tokenizer or config.model)
    policy = build_backbone(config.model, config.random_init, causal_lm=True, attn_implementation="sdpa")
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    if config.gradient_checkpointing:
        policy.gradient_checkpointing_enable()

    if config.algorithm == "dpo":
        rows = D.load_pairs(data_path, detok=config.detokenize)
    else:
        rows = [D.SFTExample(p, "-") for p in sorted({r.get("prompt") for _, r in D.read_rows(data_path)} - {None})]
    train_rows, eval_rows = D.split_by_prompt(rows, config.eval_fraction, config.seed)
    rng = random.Random(config.seed)
    per_epoch = math.ceil(len(train_rows) / config.micro_batch_size)
    engine, ds_config, total_micro, total_steps = start_engine(policy, config, per_epoch)
    device = engine.device
    reference.to(device)
    if ds_config.get("bf16", {}).get("enabled"):
        reference.to(torch.bfloat16)
    scorer = RewardScorer(reward_model, device, config.reward_task) if reward_model else None
    eval_prompts = sorted({r.prompt for r in eval_rows})[: config.eval_prompts]

    with gathered(engine.module, engine):
        before = sample_report(engine.module, reference, tokenizer, eval_prompts, config, device, scorer) \
            if eval_prompts else None
    policy_len = LengthPolicy(config.max_length, config.max_prompt_length, "truncate")
    filtering = D.FilterReport()
    history, window = [], []
    started, micro = time.perf_counter(), 0
    engine.train()
    while micro < total_micro:
        order = list(range(len(train_rows)))
        rng.shuffle(order)
        for start in range(0, len(order), config.micro_batch_size):
            if micro >= total_micro:
                break
            chunk = [train_rows[i] for i in order[start:start + config.micro_batch_size]]
            if config.algorithm == "dpo":
                loss, stats = _dpo_step(engine, reference, tokenizer, chunk, policy_len, filtering, config, device)
            else:
                with gathered(engine.module, engine):
                    loss, stats = _rloo_step(engine, reference, tokenizer, chunk, scorer, config, device)
            if loss is None:
                continue
            engine.backward(loss)
            engine.step()
            micro += 1
            window.append(stats)
            if progress:
                progress(1)
            if micro % (config.log_every * config.grad_accum) == 0 or micro == total_micro:
                entry = {"step": micro // config.grad_accum,
                         **{k: sum(w[k] for w in window) / len(window) for k in window[0]}}
                window = []
                history.append(entry)
                if log:
                    log(entry)
    train_seconds = time.perf_counter() - started
    with gathered(engine.module, engine):
        after = sample_report(engine.module, reference, tokenizer, eval_prompts, config, device, scorer) \
            if eval_prompts else None
        held_out = _dpo_accuracy(engine.module, reference, tokenizer, eval_rows, policy_len, config, device) \
            if config.algorithm == "dpo" and eval_rows else None
    result = {"algorithm": config.algorithm, "train_rows": len(train_rows), "eval_rows": len(eval_rows),
              "steps": total_steps, "train_seconds": round(train_seconds, 2), "length_filter": filtering.to_dict(),
              "history": history, "before": before, "after": after}
    if held_out is not None:
        result["eval_implicit_reward_accuracy"] = held_out
    save_causal_lm(out_dir, full_state_dict(engine.module, engine), engine.module.config, tokenizer,
                   extra={"train_config": config.model_dump(), "reward_model": reward_model,
                          "train_result": {k: v for k, v in result.items() if k != "history"}})
    result["out_dir"] = str(out_dir)
    return result


def _encode_dpo(tokenizer, pairs, policy_len, filtering):
    prompts, chosen, rejected = [], [], []
    for pair in pairs:
        fitted = policy_len.fit(encode_prompt(tokenizer, pair.prompt),
                                [encode_reply(tokenizer, pair.chosen), encode_reply(tokenizer, pair.rejected)], filtering)
        if fitted is not None:
            prompts.append(fitted[0])
            chosen.append(fitted[1][0])
            rejected.append(fitted[1][1])
    return prompts, chosen, rejected


def _dpo_step(engine, reference, tokenizer, pairs, policy_len, filtering, config, device):
    prompts, chosen, rejected = _encode_dpo(tokenizer, pairs, policy_len, filtering)
    if not prompts:
        return None, None
    pad = tokenizer.pad_token_id
    both = reply_logprobs(engine, prompts + prompts, chosen + rejected, pad, device)
    with torch.no_grad():
        ref = reply_logprobs(reference, prompts + prompts, chosen + rejected, pad, device)
    n = len(prompts)
    loss, logits = dpo_loss(both[:n], both[n:], ref[:n], ref[n:], config.beta)
    return loss, {"loss": loss.item(), "accuracy": (logits > 0).float().mean().item(),
                  "mean_margin": (logits / config.beta).mean().item()}


@torch.no_grad()
def _dpo_accuracy(model, reference, tokenizer, pairs, policy_len, config, device) -> float:
    model.eval()
    prompts, chosen, rejected = _encode_dpo(tokenizer, pairs, policy_len, D.FilterReport())
    hits = 0
    for start in range(0, len(prompts), 8):
        p, c, r = prompts[start:start + 8], chosen[start:start + 8], rejected[start:start + 8]
        pol = reply_logprobs(model, p + p, c + r, tokenizer.pad_token_id, device)
        ref = reply_logprobs(reference, p + p, c + r, tokenizer.pad_token_id, device)
        n = len(p)
        hits += int((((pol[:n] - ref[:n]) - (pol[n:] - ref[n:])) > 0).sum())
    return hits / max(1, len(prompts))


def _rloo_step(engine, reference, tokenizer, rows, scorer, config, device):
    k = config.samples_per_prompt
    if k < 2:
        raise UserError("rloo needs samples_per_prompt >= 2 (the baseline leaves one out)")
    texts = [r.prompt for r in rows]
    prompt_ids = [encode_prompt(tokenizer, p)[-config.max_prompt_length:] for p in texts]
    engine.module.eval()
    replies = sample_replies(engine.module, tokenizer, prompt_ids, config, device, k)
    engine.module.train()
    expanded = [ids for ids in prompt_ids for _ in range(k)]
    logp = reply_logprobs(engine, expanded, replies, tokenizer.pad_token_id, device)
    with torch.no_grad():
        ref_logp = reply_logprobs(reference, expanded, replies, tokenizer.pad_token_id, device)
        scores = scorer([p for p in texts for _ in range(k)],
                        [tokenizer.decode(r, skip_special_tokens=True) for r in replies]).to(device)
        kl = logp.detach() - ref_logp
        reward = (scores - config.kl_coef * kl).view(-1, k)
        baseline = (reward.sum(1, keepdim=True) - reward) / (k - 1)
        advantage = (reward - baseline).view(-1)
    loss = -(advantage * logp).mean()
    return loss, {"loss": loss.item(), "reward": scores.mean().item(), "kl": kl.mean().item()}
