"""Behaviour cloning on DeepSpeed: loss on the completion only, nothing silently truncated.

Input: rows with `prompt, completion` (or Fan et al.'s `prompt, story`). Each row becomes
`prompt \\n\\n completion <eos>`; the prompt positions get label -100. Rows longer than `max_length`
are dropped and counted (`length_filter.dropped`), never cut. With packing (`varlen`, the default on
CUDA) rows are concatenated without padding and attention stays within each row.

Every `save_every` steps and at the end a checkpoint is written (`checkpoint-<step>/`: safetensors,
config, tokenizer) with `samples.jsonl`: generations for a fixed set of held-out prompts, the seed's
"fast feedback" callback. The final model is a plain Hugging Face directory in `--out`.
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
from training.config import TrainCommon
from training.engine import full_state_dict, gathered, start_engine
from training.models import attention_implementation, build_backbone, load_tokenizer, save_state
from training.tokens import encode_prompt, encode_reply, first_fit, pack_rows, pad_rows, shuffled_chunks


class SFTConfig(TrainCommon):
    """`ahf train sft` (configs/train/sft.yaml)."""

    eval_fraction: float = 0.05
    pack_tokens: int = 4096
    packing: str = Field("auto", pattern="^(auto|none|varlen)$")
    lr: float = 2e-5
    save_every: int | None = None  # steps between checkpoints (None: only the final one)
    sample_prompts: int = 2
    sample_max_new_tokens: int = 64
    sample_temperature: float = 0.8
    sample_top_p: float = 0.95


def encode_sft(examples: list[D.SFTExample], tokenizer, max_length: int) -> tuple[list[dict], D.FilterReport]:
    report = D.FilterReport()
    encoded = []
    for example in examples:
        report.total += 1
        prompt = encode_prompt(tokenizer, example.prompt)
        completion = encode_reply(tokenizer, example.completion)
        if len(prompt) + len(completion) > max_length:
            report.dropped[f"over_max_length_{max_length}"] += 1
            continue
        report.kept += 1
        encoded.append({"ids": prompt + completion, "labels": [-100] * len(prompt) + completion})
    return encoded, report


def sft_batches(encoded: list[dict], packing: str, micro_batch_size: int, pack_tokens: int, pad_id: int,
                rng: random.Random | None) -> list:
    """(Batch, labels) pairs; labels are aligned with input_ids (-100 = no loss)."""
    out = []
    if packing == "none":
        for members in shuffled_chunks(len(encoded), micro_batch_size, rng):
            chunk = [encoded[i] for i in members]
            batch = pad_rows([e["ids"] for e in chunk], pad_id)
            labels = torch.full(batch.input_ids.shape, -100, dtype=torch.long)
            for i, e in enumerate(chunk):
                labels[i, : len(e["labels"])] = torch.tensor(e["labels"])
            out.append((batch, labels))
        return out
    bins = first_fit([len(e["ids"]) for e in encoded], pack_tokens)
    if rng:
        rng.shuffle(bins)
    for members in bins:
        chunk = [encoded[i] for i in members]
        batch = pack_rows([[e["ids"]] for e in chunk], pad_id, True, False,
                          use_position_boundaries=attention_implementation() == "flash_attention_2")
        batch.score_index = None  # a language model reads every position
        # each row starts with prompt tokens (label -100), so no loss crosses a row boundary
        out.append((batch, torch.tensor([sum((e["labels"] for e in chunk), [])])))
    return out


def completion_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over completion tokens, and how many there were."""
    shifted = labels[:, 1:].to(logits.device)
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                           ignore_index=-100, reduction="sum")
    count = int((shifted != -100).sum())
    return loss / max(count, 1), count


@torch.no_grad()
def eval_loss(model, batches, device) -> float:
    total, count = 0.0, 0
    model.eval()
    for batch, labels in batches:
        logits = model(**_lm_inputs(batch, device)).logits
        loss, n = completion_loss(logits, labels)
        total += loss.item() * n
        count += n
    model.train()
    return total / max(count, 1)


def _lm_inputs(batch, device) -> dict:
    inputs = batch.model_inputs(device)
    inputs.pop("score_index", None)
    return inputs


@torch.no_grad()
def generate_samples(model, tokenizer, prompts: list[str], config: SFTConfig, device) -> list[dict]:
    """The checkpoint callback's payload: one sampled completion per fixed prompt (seeded)."""
    was_training = model.training
    model.eval()
    samples = []
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(config.seed)
    for prompt in prompts:
        ids = torch.tensor([encode_prompt(tokenizer, prompt)], device=device)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                             max_new_tokens=config.sample_max_new_tokens, temperature=config.sample_temperature,
                             top_p=config.sample_top_p, pad_token_id=tokenizer.pad_token_id)
        samples.append({"prompt": prompt, "completion": tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)})
    torch.random.set_rng_state(generator_state)
    if was_training:
        model.train()
    return samples


def save_causal_lm(directory: Path, state: dict, model_config, tokenizer, extra: dict | None = None) -> Path:
    """A Hugging Face directory (config.json + model.safetensors + tokenizer), loadable by from_pretrained."""
    directory.mkdir(parents=True, exist_ok=True)
    if getattr(model_config, "tie_word_embeddings", False):
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    save_state(state, directory / "model.safetensors")
    model_config.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    if extra:
        (directory / "ahf_model.json").write_text(json.dumps({"kind": "causal_lm", **extra}, indent=2, default=str))
    return directory


def train_sft(config: SFTConfig, data_path: str | Path, out_dir: str | Path,
              progress: Callable[[int], None] | None = None, log: Callable[[dict], None] | None = None) -> dict:
    torch.manual_seed(config.seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(config.tokenizer or config.model)
    model = build_backbone(config.model, config.random_init, causal_lm=True)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    examples = D.load_sft(data_path, detok=config.detokenize)
    train_rows, eval_rows = D.split_by_prompt(examples, config.eval_fraction, config.seed)
    encoded, filtering = encode_sft(train_rows, tokenizer, config.max_length)
    eval_encoded, eval_filtering = encode_sft(eval_rows, tokenizer, config.max_length)
    if not encoded:
        raise UserError(f"{data_path}: every row is longer than max_length={config.max_length} "
                        f"({filtering.to_dict()}); raise max_length")
    packing = config.packing if config.packing != "auto" else ("varlen" if torch.cuda.is_available() else "none")
    rng = random.Random(config.seed)
    per_epoch = len(sft_batches(encoded, packing, config.micro_batch_size, config.pack_tokens, tokenizer.pad_token_id, None))
    engine, ds_config, total_micro, total_steps = start_engine(model, config, per_epoch)
    device = engine.device
    sample_prompts = sorted({r.prompt for r in eval_rows or train_rows})[: config.sample_prompts]
    eval_batches = sft_batches(eval_encoded, "none", config.micro_batch_size, 0, tokenizer.pad_token_id, None)

    def checkpoint(step: int) -> dict:
        with gathered(engine.module, engine):
            samples = generate_samples(engine.module, tokenizer, sample_prompts, config, device) if sample_prompts else []
            loss = eval_loss(engine.module, eval_batches, device) if eval_batches else None
        directory = out_dir / f"checkpoint-{step}"
        save_causal_lm(directory, full_state_dict(engine.module, engine), engine.module.config, tokenizer)
        with (directory / "samples.jsonl").open("w") as handle:
            for sample in samples:
                handle.write(json.dumps({"step": step, **sample}) + "\n")
        return {"step": step, "dir": str(directory), "eval_loss": loss, "samples": len(samples)}

    history, checkpoints, window = [], [], []
    metrics = (out_dir / "metrics.jsonl").open("w")
    started, real_tokens, micro = time.perf_counter(), 0, 0
    engine.train()
    while micro < total_micro:
        for batch, labels in sft_batches(encoded, packing, config.micro_batch_size, config.pack_tokens,
                                         tokenizer.pad_token_id, rng):
            if micro >= total_micro:
                break
            loss, _ = completion_loss(engine(**_lm_inputs(batch, device)).logits, labels)
            engine.backward(loss)
            engine.step()
            micro += 1
            real_tokens += batch.real_tokens
            window.append(loss.item())
            if progress:
                progress(1)
            step = micro // config.grad_accum
            if micro % config.grad_accum == 0 and (step % config.log_every == 0 or micro == total_micro):
                entry = {"step": step, "loss": sum(window) / len(window),
                         "real_tokens_per_s": real_tokens / (time.perf_counter() - started)}
                window = []
                history.append(entry)
                metrics.write(json.dumps(entry) + "\n")
                metrics.flush()
                if log:
                    log(entry)
            if config.save_every and micro % config.grad_accum == 0 and step % config.save_every == 0 \
                    and micro < total_micro:
                checkpoints.append(checkpoint(step))
                metrics.write(json.dumps({"checkpoint": checkpoints[-1]}) + "\n")
    train_seconds = time.perf_counter() - started
    checkpoints.append(checkpoint(total_steps))
    metrics.write(json.dumps({"checkpoint": checkpoints[-1]}) + "\n")
    metrics.close()
    result = {"train_rows": len(train_rows), "train_used": len(encoded), "eval_rows": len(eval_rows),
              "length_filter": filtering.to_dict(), "eval_length_filter": eval_filtering.to_dict(),
              "packing": packing, "steps": total_steps, "train_seconds": round(train_seconds, 2),
              "real_tokens_per_s": round(real_tokens / train_seconds, 1), "history": history,
              "checkpoints": checkpoints, "eval_loss": checkpoints[-1]["eval_loss"]}
    save_causal_lm(out_dir, full_state_dict(engine.module, engine), engine.module.config, tokenizer,
                   extra={"train_config": config.model_dump(),
                          "train_result": {k: v for k, v in result.items() if k != "history"}})
    result["out_dir"] = str(out_dir)
    return result
