"""Reward models on DeepSpeed: pairwise Bradley-Terry (optional margin) and the seed's tier-conditioned form.

Pairwise: loss = -log sigmoid(r(prompt, chosen) - r(prompt, rejected) - margin), the margin column
when present and `use_margin` is on (TRL's convention). Tier: prompt + completion -> good/ok/bad
(cross-entropy); its scalar reward is the expected tier. Logged every `log_every` steps: loss,
accuracy (chosen scored higher / tier correct), mean margin (r_chosen - r_rejected; for tiers the
gap between the mean reward of good and bad rows in the batch).

Joint multi-task training (`data_path` = {task: pairs file}; see training.multitask): one model on
all tasks, conditioned by a task marker in the prompt or by a per-task head; held-out evaluation and
logged accuracy per task.

Output directory: `model.safetensors`, `ahf_model.json` (with the training config and final
metrics), tokenizer files, `metrics.jsonl` (one line per logged step and per evaluation).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from pydantic import Field

from ahf.console import UserError
from training import data as D
from training import multitask as M
from training.config import TrainCommon
from training.attention import BLOCK_SPARSE, without_attention_dropout
from training.engine import full_state_dict, start_engine
from training.models import RewardModel, build_backbone, load_tokenizer
from training.tokens import LengthPolicy, encode_prompt, encode_reply, first_fit, pack_rows, pad_rows, shuffled_chunks


class RMConfig(TrainCommon):
    """`ahf train rm` (configs/train/rm.yaml); `micro_batch_size` counts pairs per padded step."""

    objective: str = Field("pairwise", pattern="^(pairwise|tier)$")
    use_margin: bool = True
    max_prompt_length: int = 128
    overlong: str = Field("truncate", pattern="^(truncate|drop)$")
    eval_pairs: str | dict[str, str] | None = None  # a held-out file instead of a split ({task: file} when joint)
    pack_tokens: int = 4096  # tokens per packed row (packed layouts)
    packing: str = Field("auto", pattern="^(auto|none|varlen|shared_prompt)$")
    # packed rows: a dense (L, L) mask through SDPA, or FlexAttention skipping the masked tiles
    # (training.attention: no attention dropout; unmeasured on a GPU so far, unfused so slow on the CPU)
    attention: str = Field("sdpa", pattern="^(sdpa|block_sparse)$")
    eval_batch_size: int = 16
    # joint multi-task training (several --task NAME=FILE): how the task is shown to the model, and
    # whether smaller tasks are up-sampled to the largest each epoch
    multitask: str = Field("task_token", pattern="^(task_token|task_head)$")
    task_balance: str = Field("proportional", pattern="^(proportional|equal)$")


# ----------------------------------------------------------------------------- encoding

def encode_pairs(pairs: list[D.Pair], tokenizer, policy: LengthPolicy) -> tuple[list[dict], D.FilterReport]:
    report = D.FilterReport()
    encoded = []
    for pair in pairs:
        prompt = encode_prompt(tokenizer, pair.prompt)
        chosen, rejected = encode_reply(tokenizer, pair.chosen), encode_reply(tokenizer, pair.rejected)
        if pair.rejected_prompt is None:
            fitted = policy.fit(prompt, [chosen, rejected], report)
            if fitted is None:
                continue
            prompt, (chosen, rejected) = fitted
            rejected_prompt = prompt
        else:  # the two replies answer different prompts: fit each on its own, count the pair once
            side = D.FilterReport()
            first = policy.fit(prompt, [chosen], side)
            second = policy.fit(encode_prompt(tokenizer, pair.rejected_prompt), [rejected], side)
            report.total += 1
            report.truncated.update(side.truncated)
            if first is None or second is None:
                report.dropped.update(side.dropped)
                continue
            report.kept += 1
            (prompt, (chosen,)), (rejected_prompt, (rejected,)) = first, second
        encoded.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "rejected_prompt": rejected_prompt,
                        "margin": pair.margin or 0.0, "pair": pair})
    return encoded, report


def encode_points(points: list[D.PointExample], tokenizer, policy: LengthPolicy) -> tuple[list[dict], D.FilterReport]:
    report = D.FilterReport()
    encoded = []
    for point in points:
        fitted = policy.fit(encode_prompt(tokenizer, point.prompt), [encode_reply(tokenizer, point.completion)], report)
        if fitted is not None:
            encoded.append({"ids": fitted[0] + fitted[1][0], "tier": point.tier})
    return encoded, report


def resolve_packing(packing: str, model: RewardModel) -> str:
    """Packing needs a causal backbone that reads the score at a token; encoders stay padded."""
    if packing == "auto":
        return "shared_prompt" if torch.cuda.is_available() and model.pooling == "last" else "none"
    # (train_reward_model downgrades auto's shared_prompt to varlen for pairs with a rejected_prompt)
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
            rows = [e["prompt"] + e["chosen"] for e in chunk] + [e["rejected_prompt"] + e["rejected"] for e in chunk]
            batch = pad_rows(rows, pad_id)
            batch.extras["pairs"] = members
            batch.extras["tasks"] = torch.tensor([e.get("task", 0) for e in chunk])
            batches.append((batch, torch.tensor([e["margin"] for e in chunk])))
        return batches
    shared = packing == "shared_prompt"
    if shared and any(e["rejected_prompt"] is not e["prompt"] for e in encoded):
        raise UserError("packing=shared_prompt needs chosen and rejected to share their prompt "
                        "(these pairs have rejected_prompt); use packing=varlen")
    lengths = [len(e["prompt"]) + len(e["chosen"]) + len(e["rejected"]) + (0 if shared else len(e["rejected_prompt"]))
               for e in encoded]
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
        else:
            seqs = [[e["prompt"] + e["chosen"]] for e in chunk] + [[e["rejected_prompt"] + e["rejected"]] for e in chunk]
            from training.models import attention_implementation
            batch = pack_rows(seqs, pad_id, True, False, block_sparse_length=sparse_length,
                              use_position_boundaries=not block_sparse
                              and attention_implementation() == "flash_attention_2")
        batch.extras["pairs"] = members
        batch.extras["tasks"] = torch.tensor([e.get("task", 0) for e in chunk])
        batches.append((batch, torch.tensor([e["margin"] for e in chunk])))
    return batches


def bt_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin.to(diff)
    return -F.logsigmoid(diff).mean()


# ----------------------------------------------------------------------------- scoring / eval

def task_inputs(model: RewardModel, batch, device) -> dict:
    """Model inputs; a per-task-head model also gets each scored row's task (chosen rows, then rejected)."""
    inputs = batch.model_inputs(device)
    if model.task_conditioning == "task_head":
        inputs["task_ids"] = batch.extras["tasks"].repeat(2).to(device)
    return inputs


@torch.no_grad()
def score_pairs(model: RewardModel, tokenizer, pairs: list[D.Pair], max_length: int, max_prompt_length: int = 128,
                batch_size: int = 16, task: str | None = None) -> tuple[torch.Tensor, torch.Tensor, D.FilterReport]:
    """Scalar rewards for chosen and rejected (padded batches; pairs too long are truncated and counted).
    A joint multi-task model needs `task` (one of its recorded tasks); a single-task model refuses one."""
    model.eval()
    device = next(model.parameters()).device
    task_index = model.task_index(task)
    if model.task_marker:
        pairs = M.with_task_marker(pairs, task, model.task_marker)
    encoded, report = encode_pairs(pairs, tokenizer, LengthPolicy(max_length, max_prompt_length, "truncate"))
    for e in encoded:
        e["task"] = task_index or 0
    chosen, rejected = [], []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _null()
    for batch, _ in pair_batches(encoded, "none", batch_size, 0, tokenizer.pad_token_id, None):
        with autocast:
            scores = RewardModel.score_from_logits(model(**task_inputs(model, batch, device)).float())
        half = scores.shape[0] // 2
        chosen.append(scores[:half].cpu())
        rejected.append(scores[half:].cpu())
    return torch.cat(chosen), torch.cat(rejected), report


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def length_baseline(pairs: list[D.Pair]) -> float:
    """Accuracy of "the longer reply (in words) wins"; ties count half."""
    wins = sum(1.0 if len(p.chosen.split()) > len(p.rejected.split()) else
               0.5 if len(p.chosen.split()) == len(p.rejected.split()) else 0.0 for p in pairs)
    return wins / len(pairs)


def bucket_accuracy(pairs: list[D.Pair], correct: list[bool], buckets: int = 3) -> dict | None:
    """Accuracy by margin (or score-ratio) tercile, when the file carries one."""
    key = "margin" if all(p.margin is not None for p in pairs) else \
        "score_ratio" if all(p.score_ratio is not None for p in pairs) else None
    if key is None:
        return None
    values = [getattr(p, key) for p in pairs]
    order = sorted(range(len(pairs)), key=lambda i: values[i])
    out = []
    for b in range(buckets):
        members = order[b * len(order) // buckets:(b + 1) * len(order) // buckets]
        if members:
            out.append({"range": [values[members[0]], values[members[-1]]], "n": len(members),
                        "accuracy": sum(correct[i] for i in members) / len(members),
                        "length_baseline": length_baseline([pairs[i] for i in members])})
    return {"by": key, "buckets": out}


def evaluate_pairs(model: RewardModel, tokenizer, pairs: list[D.Pair], max_length: int,
                   max_prompt_length: int = 128, batch_size: int = 16, task: str | None = None) -> dict:
    chosen, rejected, report = score_pairs(model, tokenizer, pairs, max_length, max_prompt_length, batch_size, task)
    correct = (chosen > rejected).tolist()
    result = {"pairs": len(pairs), "accuracy": sum(correct) / len(correct),
              "length_baseline": length_baseline(pairs),
              "mean_margin": float((chosen - rejected).mean()), "truncation": report.to_dict()}
    buckets = bucket_accuracy(pairs, correct)
    if buckets:
        result["by_bucket"] = buckets
    return result


def evaluate_reward_model(model_dir: str | Path, pairs_path: str | Path, detokenize: bool | None = None,
                          max_length: int | None = None, batch_size: int = 16, task: str | None = None) -> dict:
    """`ahf eval rm`: accuracy of a saved reward model on a pairs file, next to the length baseline.
    `task`: which task's conditioning to score with (required for, and only for, a joint multi-task model)."""
    card = json.loads((Path(model_dir) / "ahf_model.json").read_text()) if (Path(model_dir) / "ahf_model.json").exists() else {}
    trained_with = card.get("train_config", {})
    model = RewardModel.load(model_dir)
    model.task_index(task)  # refuse a missing / unknown / superfluous task before reading the pairs
    if torch.cuda.is_available():
        model = model.cuda()
    tokenizer = load_tokenizer(str(model_dir))
    detok = trained_with.get("detokenize", False) if detokenize is None else detokenize
    pairs = D.load_pairs(pairs_path, detok=detok)
    limit = max_length or trained_with.get("max_length") or 512
    result = evaluate_pairs(model, tokenizer, pairs, limit, trained_with.get("max_prompt_length", 128), batch_size,
                            task)
    return {"model": str(model_dir), "pairs_file": str(pairs_path), **({"task": task} if task else {}), **result}


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


def train_reward_model(config: RMConfig, data_path: str | Path | dict[str, str | Path], out_dir: str | Path,
                       progress: Callable[[int], None] | None = None,
                       log: Callable[[dict], None] | None = None) -> dict:
    """Train on `data_path` (pairs, or pointwise tiers for objective=tier), evaluate on held-out prompts.
    `data_path` as {task: pairs file} (two or more) trains one joint multi-task model (`config.multitask`)."""
    tasks = _check_multitask(config, data_path)
    if config.attention == "block_sparse" and not torch.cuda.is_available():
        raise UserError("attention=block_sparse trains on CUDA only (FlexAttention has no backward on the CPU); "
                        "use attention=sdpa")
    torch.manual_seed(config.seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = build_reward_model(config, list(tasks) if tasks else None)
    policy = LengthPolicy(config.max_length, config.max_prompt_length, config.overlong)

    by_task: dict[str, dict] = {}
    if tasks:
        train_by_task, eval_by_task = M.load_task_pairs(tasks, config.eval_pairs, config.eval_fraction,
                                                        config.seed, config.detokenize)
        encoded, filtering = _encode_tasks(train_by_task, model, tokenizer, policy, by_task)
        train_rows = [p for rows in train_by_task.values() for p in rows]
        eval_rows = [p for rows in eval_by_task.values() for p in rows]
        for name in tasks:
            by_task[name] |= {"train_rows": len(train_by_task[name]), "eval_rows": len(eval_by_task[name]),
                              "train_prompts": len({r.prompt for r in train_by_task[name]}),
                              "eval_prompts": len({r.prompt for r in eval_by_task[name]})}
    else:
        if config.objective == "pairwise":
            examples = D.load_pairs(data_path, detok=config.detokenize)
        else:
            examples = D.load_pointwise(data_path, detok=config.detokenize)
        if config.eval_pairs:
            train_rows, eval_rows = examples, D.load_pairs(config.eval_pairs, detok=config.detokenize)
        else:
            train_rows, eval_rows = D.split_by_prompt(examples, config.eval_fraction, config.seed)
        if config.objective == "pairwise":
            encoded, filtering = encode_pairs(train_rows, tokenizer, policy)
        else:
            encoded, filtering = encode_points(train_rows, tokenizer, policy)
    if not encoded:
        raise UserError(f"{data_path}: no training rows left after length filtering {filtering.to_dict()}")
    packing = resolve_packing(config.packing, model) if config.objective == "pairwise" else "none"
    if packing == "shared_prompt" and config.packing == "auto" and any(
            e["rejected_prompt"] is not e["prompt"] for e in encoded):
        packing = "varlen"
    block_sparse = config.attention == "block_sparse"
    if block_sparse and packing == "none":
        raise UserError("attention=block_sparse is for packed rows: set packing=shared_prompt or varlen "
                        "(packing=auto packs only on a GPU)")

    rng = random.Random(config.seed)
    task_of = [e.get("task", 0) for e in encoded]

    def make_batches():
        if config.objective != "pairwise":
            return _tier_batches(encoded, config.micro_batch_size, tokenizer.pad_token_id, rng)
        epoch = encoded  # proportional: every pair once, mixed across tasks by the batcher's shuffle
        if tasks and config.task_balance == "equal":
            epoch = [encoded[i] for i in M.epoch_order(task_of, "equal", rng)]
        return pair_batches(epoch, packing, config.micro_batch_size, config.pack_tokens, tokenizer.pad_token_id, rng,
                            block_sparse)

    first_epoch = make_batches()
    per_epoch, pairs_per_epoch = len(first_epoch), sum(len(b.extras.get("pairs", ())) for b, _ in first_epoch)
    engine, ds_config, total_micro, total_steps = start_engine(model, config, per_epoch)
    device = engine.device

    metrics_file = (out_dir / "metrics.jsonl").open("w")
    history, window = [], []
    task_hits = torch.zeros(len(tasks or [0]))  # per-task correct / seen pairs in the current log window
    task_seen = torch.zeros(len(tasks or [0]))
    started = time.perf_counter()
    real_tokens = 0
    micro = 0
    engine.train()
    while micro < total_micro:
        for batch, margins in make_batches():
            if micro >= total_micro:
                break
            logits = engine(**task_inputs(model, batch, device)).float()
            if config.objective == "pairwise":
                half = logits.shape[0] // 2
                chosen, rejected = logits[:half], logits[half:]
                loss = bt_loss(chosen, rejected, margins if config.use_margin else None)
                stats = {"loss": loss.item(), "accuracy": (chosen > rejected).float().mean().item(),
                         "mean_margin": (chosen - rejected).mean().item()}
                if tasks:
                    batch_tasks = batch.extras["tasks"]
                    task_hits.index_add_(0, batch_tasks, (chosen > rejected).float().cpu())
                    task_seen.index_add_(0, batch_tasks, torch.ones(len(batch_tasks)))
            else:
                loss = F.cross_entropy(logits, margins.to(device))
                stats = _tier_stats(loss, logits, margins.to(device))
            engine.backward(loss)
            engine.step()
            micro += 1
            real_tokens += batch.real_tokens
            window.append(stats)
            if progress:
                progress(1)
            if micro % (config.log_every * config.grad_accum) == 0 or micro == total_micro:
                entry = {"step": micro // config.grad_accum, "micro_step": micro,
                         **{k: sum(w[k] for w in window) / len(window) for k in window[0]},
                         "lr": engine.get_lr()[0] if hasattr(engine, "get_lr") else config.lr,
                         "real_tokens_per_s": real_tokens / (time.perf_counter() - started)}
                if tasks:  # pairs of each task seen in this window (a task absent from it is left out)
                    entry["accuracy_by_task"] = {name: (task_hits[t] / task_seen[t]).item()
                                                 for t, name in enumerate(tasks) if task_seen[t] > 0}
                    entry["pairs_by_task"] = {name: int(task_seen[t]) for t, name in enumerate(tasks)}
                    task_hits.zero_()
                    task_seen.zero_()
                window = []
                history.append(entry)
                metrics_file.write(json.dumps(entry) + "\n")
                metrics_file.flush()
                if log:
                    log(entry)
    train_seconds = time.perf_counter() - started

    state = full_state_dict(engine.module, engine)
    model.save(out_dir, tokenizer, extra={"train_config": config.model_dump()}, state_dict=state)
    del engine
    # evaluate the saved model: the same weights `ahf eval rm` will read
    final = RewardModel.load(out_dir, attn_implementation="sdpa").to(device)

    result = {"train_rows": len(train_rows), "train_used": len(encoded), "eval_rows": len(eval_rows),
              "train_prompts": len({r.prompt for r in train_rows}), "eval_prompts": len({r.prompt for r in eval_rows}),
              "length_filter": filtering.to_dict(), "packing": packing, "steps": total_steps,
              "micro_steps": micro, "train_seconds": round(train_seconds, 2),
              "real_tokens_per_s": round(real_tokens / train_seconds, 1), "history": history,
              "deepspeed": {"config": config.deepspeed, "zero_stage": ds_config.get("zero_optimization", {}).get("stage"),
                            "bf16": ds_config.get("bf16", {}).get("enabled", False)}}
    if tasks:
        result |= {"tasks": list(tasks), "task_conditioning": config.multitask, "task_balance": config.task_balance,
                   "pairs_per_epoch": pairs_per_epoch, "by_task": by_task}
        result["eval_by_task"] = {name: evaluate_pairs(final, tokenizer, eval_by_task[name], config.max_length,
                                                       config.max_prompt_length, config.eval_batch_size, task=name)
                                  for name in tasks if eval_by_task[name]}
        if result["eval_by_task"]:
            metrics_file.write(json.dumps({"eval_by_task": result["eval_by_task"]}) + "\n")
    elif eval_rows:
        eval_pairs = eval_rows if config.objective == "pairwise" else _tier_pairs(eval_rows)
        if eval_pairs:
            result["eval"] = evaluate_pairs(final, tokenizer, eval_pairs, config.max_length, config.max_prompt_length,
                                            config.eval_batch_size)
        if config.objective == "tier":
            result["eval_tier_accuracy"] = _tier_accuracy(final, tokenizer, eval_rows, policy, config.eval_batch_size)
        metrics_file.write(json.dumps({"eval": {k: v for k, v in result.items() if k.startswith("eval")}}) + "\n")
    metrics_file.close()
    card_path = out_dir / "ahf_model.json"
    card = json.loads(card_path.read_text())
    card["train_result"] = {k: v for k, v in result.items() if k != "history"}
    card_path.write_text(json.dumps(card, indent=2, default=str))
    result["out_dir"] = str(out_dir)
    return result


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
                  by_task: dict[str, dict]) -> tuple[list[dict], D.FilterReport]:
    """Encode each task's pairs with its conditioning; every encoded pair carries its task index."""
    encoded, total = [], D.FilterReport()
    for index, (name, pairs) in enumerate(train_by_task.items()):
        if model.task_marker:
            pairs = M.with_task_marker(pairs, name, model.task_marker)
        rows, report = encode_pairs(pairs, tokenizer, policy)
        for row in rows:
            row["task"] = index
        encoded += rows
        by_task[name] = {"train_used": len(rows), "length_filter": report.to_dict()}
        total.total += report.total
        total.kept += report.kept
        total.dropped.update(report.dropped)
        total.truncated.update(report.truncated)
    return encoded, total


def _tier_batches(encoded: list[dict], size: int, pad_id: int, rng: random.Random) -> list:
    out = []
    for members in shuffled_chunks(len(encoded), size, rng):
        chunk = [encoded[i] for i in members]
        out.append((pad_rows([e["ids"] for e in chunk], pad_id), torch.tensor([e["tier"] for e in chunk])))
    return out


def _tier_stats(loss, logits, tiers) -> dict:
    reward = RewardModel.score_from_logits(logits.detach())
    good, bad = reward[tiers == 2], reward[tiers == 0]
    gap = (good.mean() - bad.mean()).item() if len(good) and len(bad) else 0.0
    return {"loss": loss.item(), "accuracy": (logits.argmax(-1) == tiers).float().mean().item(), "mean_margin": gap}


def _tier_pairs(points: list[D.PointExample]) -> list[D.Pair]:
    """Held-out pairs from tiers: a better-tier and a worse-tier completion of the same prompt."""
    by_prompt: dict[str, list[D.PointExample]] = {}
    for p in points:
        by_prompt.setdefault(p.prompt, []).append(p)
    return [D.Pair(prompt, a.completion, b.completion) for prompt, group in by_prompt.items()
            for a in group for b in group if a.tier > b.tier]


@torch.no_grad()
def _tier_accuracy(model: RewardModel, tokenizer, points, policy: LengthPolicy, batch_size: int) -> float:
    encoded, _ = encode_points(points, tokenizer, LengthPolicy(policy.max_length, policy.max_prompt_length, "truncate"))
    device = next(model.parameters()).device
    model.eval()
    hits = 0
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        batch = pad_rows([e["ids"] for e in chunk], tokenizer.pad_token_id)
        predicted = model(**batch.model_inputs(device)).argmax(-1).cpu()
        hits += int((predicted == torch.tensor([e["tier"] for e in chunk])).sum())
    return hits / max(1, len(encoded))
