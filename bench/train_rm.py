#!/usr/bin/env python
"""Pairwise reward-model training throughput: ahf's trainer vs TRL's RewardTrainer, same data, same run.

Data: synthetic pairs with Reddit-like lengths (prompt 20-80 tokens, replies log-normal around 200
tokens, each prompt+reply <= 1,024), or `--real-pairs FILE` (tokenised with the real GPT-2 tokenizer).
Model: GPT-2 of the chosen size with random init (gpt2-xl: 48 x 1600, the speed of the real one).

Systems (`--systems`):
- `ahf`: training.rm's path: DeepSpeed engine (`--deepspeed`), bf16 on GPU, chosen and rejected
  packed with their shared prompt into rows of `--pack-tokens` (4-D block mask through SDPA, or with
  `--attention block_sparse` FlexAttention skipping the masked tiles: CUDA only), fused
  torch AdamW, optional `--compile`.
- `trl`: trl.RewardTrainer, per-device batch `--trl-batch`, bf16 on GPU.
- `trl_ds`: the same with the same DeepSpeed JSON.

Reported per system: real (non-padding) tokens/s over the timed steps (after `--warmup-steps`),
`unshared_tokens_per_s` (the same pairs counted as TRL feeds them, prompt twice: the like-for-like rate),
pairs/s, MFU (6 x non-embedding parameters (`training.loop.matmul_params`) x real tokens/s / `--peak-tflops`,
default the GPU's peak by name (`training.loop.PEAK_FLOPS`); attention FLOPs not counted, so it understates a
little; the trainers' own `mfu` adds nanoGPT's attention term), peak GPU memory (max_memory_allocated; CPU: max RSS).

GPU:  python bench/train_rm.py --size xl --steps 30 --out bench/out/train_rm_h100.json
CPU smoke (a few seconds per system):  python bench/train_rm.py --size tiny --pairs 64 --steps 3 --warmup-steps 1
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from training.engine import ensure_single_process_env, initialize, load_deepspeed_config  # noqa: E402
from training.loop import device_peak_flops, matmul_params  # noqa: E402
from training.models import RewardModel, build_backbone  # noqa: E402
from training.rm import bt_loss, pair_batches  # noqa: E402
from training.tiny import GPT2_TOKENIZER  # noqa: E402

SIZES = {
    "tiny": {"n_layer": 2, "n_embd": 64, "n_head": 2},
    "small": {"n_layer": 12, "n_embd": 768, "n_head": 12},
    "medium": {"n_layer": 24, "n_embd": 1024, "n_head": 16},
    "large": {"n_layer": 36, "n_embd": 1280, "n_head": 20},
    "xl": {"n_layer": 48, "n_embd": 1600, "n_head": 25},
}
EOS = 50256


def synthetic_pairs(n: int, seed: int, max_len: int = 1024) -> list[dict]:
    rng = random.Random(seed)

    def reply(budget):
        length = int(min(budget, max(8, rng.lognormvariate(math.log(200), 0.6))))
        return [rng.randrange(50000) for _ in range(length - 1)] + [EOS]

    pairs = []
    for _ in range(n):
        prompt = [rng.randrange(50000) for _ in range(rng.randint(20, 80))]
        budget = max_len - len(prompt)
        pairs.append({"prompt": prompt, "chosen": reply(budget), "rejected": reply(budget), "margin": 0.0,
                      "rejected_prompt": prompt})
    return pairs


def real_pairs(path: str, max_len: int = 1024) -> list[dict]:
    from training import data as D
    from training.models import load_tokenizer
    from training.rm import encode_pairs
    from training.tokens import LengthPolicy

    tokenizer = load_tokenizer(str(GPT2_TOKENIZER))
    encoded, _ = encode_pairs(D.load_pairs(path, detok=True), tokenizer, LengthPolicy(max_len, 128))
    return encoded


def peak_memory_gib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (process-wide)


def reset_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gpt2_config(size: str) -> dict:
    return {"model_type": "gpt2", "n_positions": 1024, "vocab_size": 50257, **SIZES[size]}


def summarise(name, tokens, pairs, seconds, params, peak_tflops, extra=None, pair_tokens=None) -> dict:
    tps = tokens / seconds
    return {"system": name, "real_tokens_per_s": round(tps, 1),
            "unshared_tokens_per_s": round((pair_tokens if pair_tokens is not None else tokens) / seconds, 1),
            "pairs_per_s": round(pairs / seconds, 2),
            "timed_seconds": round(seconds, 2), "mfu": round(6 * params * tps / (peak_tflops * 1e12), 4)
            if peak_tflops else None, "peak_memory_gib": round(peak_memory_gib(), 2), **(extra or {})}


def run_ahf(pairs, args, peak_tflops) -> dict:
    reset_memory()
    torch.manual_seed(args.seed)
    block_sparse = args.attention == "block_sparse"
    if block_sparse and not torch.cuda.is_available():
        raise SystemExit("--attention block_sparse needs CUDA (FlexAttention has no backward on the CPU)")
    attn = "sdpa"
    if block_sparse:
        from training.attention import BLOCK_SPARSE, without_attention_dropout

        attn = BLOCK_SPARSE
    model = RewardModel(build_backbone("bench", gpt2_config(args.size), attn_implementation=attn))
    if block_sparse:
        without_attention_dropout(model.backbone)
    if args.gradient_checkpointing:
        model.backbone.gradient_checkpointing_enable()
    params = matmul_params(model)
    config = load_deepspeed_config(args.deepspeed, micro_batch_size=1, grad_accum=1, lr=1e-5,
                                   warmup_steps=1, total_steps=args.steps + args.warmup_steps)
    engine, _, _ = initialize(model, config)
    if args.compile:
        engine.module.backbone = torch.compile(engine.module.backbone, dynamic=True)
    batches = pair_batches(pairs, "shared_prompt", 0, args.pack_tokens, EOS, random.Random(args.seed), block_sparse)
    device = engine.device
    tokens = pair_count = unshared = 0
    started = None
    for step in range(args.warmup_steps + args.steps):
        batch, _ = batches[step % len(batches)]
        if step == args.warmup_steps:
            sync()
            started = time.perf_counter()
        scores = engine(**batch.model_inputs(device)).float()
        half = scores.shape[0] // 2
        loss = bt_loss(scores[:half], scores[half:])
        engine.backward(loss)
        engine.step()
        if step >= args.warmup_steps:
            tokens += batch.real_tokens
            pair_count += half
            unshared += sum(2 * len(pairs[i]["prompt"]) + len(pairs[i]["chosen"]) + len(pairs[i]["rejected"])
                            for i in batch.extras["pairs"])
    sync()
    result = summarise("ahf", tokens, pair_count, time.perf_counter() - started, params, peak_tflops,
                       {"deepspeed": args.deepspeed, "bf16": config["bf16"]["enabled"], "layout": "shared_prompt",
                        "attention": args.attention, "pack_tokens": args.pack_tokens, "compile": args.compile,
                        "loss": loss.item()},
                       pair_tokens=unshared)
    del engine, model
    return result


def run_trl(pairs, args, peak_tflops, deepspeed: bool) -> dict:
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForSequenceClassification, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from training.models import load_tokenizer

    reset_memory()
    torch.manual_seed(args.seed)
    settings = gpt2_config(args.size)
    config = AutoConfig.for_model(settings.pop("model_type"), **settings, num_labels=1, pad_token_id=EOS)
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")
    params = matmul_params(model)
    rows = [{"chosen_ids": p["prompt"] + p["chosen"], "rejected_ids": p["prompt"] + p["rejected"]} for p in pairs]
    tokens_per_pair = sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows) / len(rows)
    timing = {}

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == args.warmup_steps:
                sync()
                timing["start"] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            sync()
            timing["end"] = time.perf_counter()

    ds = None
    if deepspeed:
        ds = load_deepspeed_config(args.deepspeed, micro_batch_size=args.trl_batch, grad_accum=1, lr=1e-5,
                                   warmup_steps=1, total_steps=args.steps + args.warmup_steps)
    on_gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as out:
        training_args = RewardConfig(
            output_dir=out, per_device_train_batch_size=args.trl_batch, max_steps=args.warmup_steps + args.steps,
            learning_rate=1e-5, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, bf16=on_gpu, logging_steps=10**6, save_strategy="no", report_to=[],
            max_length=1024, gradient_checkpointing=args.gradient_checkpointing, deepspeed=ds,
            use_cpu=not on_gpu, dataloader_drop_last=True, disable_dropout=True, seed=args.seed)
        trainer = RewardTrainer(model=model, args=training_args, train_dataset=Dataset.from_list(rows),
                                processing_class=load_tokenizer(str(GPT2_TOKENIZER)), callbacks=[Timer()])
        trainer.train()
    pairs_done = args.steps * args.trl_batch
    # tokens: the mean real length per pair times pairs trained (random order: exact in expectation)
    result = summarise("trl_ds" if deepspeed else "trl", tokens_per_pair * pairs_done, pairs_done,
                       timing["end"] - timing["start"], params, peak_tflops,
                       {"deepspeed": args.deepspeed if deepspeed else None, "bf16": on_gpu,
                        "per_device_batch": args.trl_batch})
    del trainer, model
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="xl")
    parser.add_argument("--pairs", type=int, default=2000, help="synthetic pairs to draw")
    parser.add_argument("--real-pairs", help="use a pairs JSONL instead (e.g. the WritingPrompts pairs)")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps per system")
    parser.add_argument("--warmup-steps", type=int, default=5)
    parser.add_argument("--pack-tokens", type=int, default=8192)
    parser.add_argument("--trl-batch", type=int, default=4)
    parser.add_argument("--deepspeed", default="zero2")
    parser.add_argument("--systems", default="ahf,trl,trl_ds")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--attention", default="sdpa", choices=["sdpa", "block_sparse"],
                        help="packed rows: dense mask through SDPA, or FlexAttention (training.attention; CUDA only)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, help="device bf16 dense peak (default: by GPU name)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the results JSON here")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ensure_single_process_env()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    peak = args.peak_tflops or ((device_peak_flops() or 0) / 1e12) or None
    pairs = real_pairs(args.real_pairs) if args.real_pairs else synthetic_pairs(args.pairs, args.seed)
    lengths = [len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for p in pairs]
    report = {"device": device, "torch": torch.__version__, "size": args.size, "data": args.real_pairs or "synthetic",
              "pairs": len(pairs), "mean_tokens_per_pair_shared_prompt": round(sum(lengths) / len(lengths), 1),
              "args": vars(args), "results": []}
    for system in args.systems.split(","):
        try:
            if system == "ahf":
                result = run_ahf(pairs, args, peak)
            elif system in {"trl", "trl_ds"}:
                result = run_trl(pairs, args, peak, deepspeed=system == "trl_ds")
            else:
                raise SystemExit(f"unknown system {system!r}")
        except Exception as exc:  # one failing system must not hide the others' figures
            result = {"system": system, "error": f"{type(exc).__name__}: {exc}"}
        report["results"].append(result)
        print(json.dumps(result), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
