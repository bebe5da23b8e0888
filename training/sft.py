"""Behaviour cloning on DeepSpeed: loss on the completion only, nothing silently truncated.

Input: rows with `prompt, completion` (or Fan et al.'s `prompt, story`), or an `ahf export --format sft`
directory (its train split; eval loss and sample prompts from its validation split). Each row becomes
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
from pathlib import Path
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from ahf.console import UserError
from training import data as D
from training.config import TrainCommon
from training.engine import full_state_dict, gathered, rank
from training.loop import Trainer
from training.models import attention_implementation, build_backbone, load_tokenizer, save_causal_lm
from training.tokens import encode_prompt, encode_reply, first_fit, pack_rows, pad_rows, shuffled_chunks


class SFTConfig(TrainCommon):
    """`ahf train sft` (configs/train/sft.yaml): the common fields (training.config) and these."""

    eval_fraction: float = Field(0.05, description="share of the training prompts held out (eval loss, sample "
                                                   "prompts) when the data brings no validation split")
    lr: float = Field(2e-5, description="peak learning rate (linear warm-up, then linear decay to 0)")
    pack_tokens: int = Field(4096, description="tokens per packed row (packing varlen)")
    packing: Literal["auto", "none", "varlen"] = Field(
        "auto", description="batch layout: auto (varlen on CUDA, else none) | none (padded) | varlen (packed)")
    sample_prompts: int = Field(2, description="held-out prompts sampled at every checkpoint (samples.jsonl)")
    sample_max_new_tokens: int = Field(64, description="tokens generated per sample")
    sample_temperature: float = Field(0.8, description="sampling temperature of the checkpoint samples")
    sample_top_p: float = Field(0.95, description="nucleus (top-p) of the checkpoint samples")


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


class SFTTrainer(Trainer):
    """Prompt-masked next-token loss on `prompt, completion` rows; checkpoints carry sampled completions."""

    def __init__(self, config: SFTConfig, data_path, out_dir, progress=None, log=None):
        super().__init__(config, out_dir, progress, log)
        train, held = self.read(D.read_source(data_path, D.load_sft, config.detokenize, ("sft",)), D.load_sft)
        torch.manual_seed(config.seed)
        self.tokenizer = load_tokenizer(config.tokenizer or config.model)
        self.model = build_backbone(config.model, config.random_init, causal_lm=True)
        if config.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        self.encoded, filtering = encode_sft(train, self.tokenizer, config.max_length)
        eval_encoded, eval_filtering = encode_sft(held, self.tokenizer, config.max_length)
        if not self.encoded:
            raise UserError(f"{data_path}: every row is longer than max_length={config.max_length} "
                            f"({filtering.to_dict()}); raise max_length")
        self.packing = config.packing if config.packing != "auto" else (
            "varlen" if torch.cuda.is_available() else "none")
        self.rng = random.Random(config.seed)
        self.sample_prompts = sorted({r.prompt for r in held or train})[: config.sample_prompts]
        self.eval_batches = sft_batches(eval_encoded, "none", config.micro_batch_size, 0,
                                        self.tokenizer.pad_token_id, None)
        self.facts |= {"train_used": len(self.encoded), "length_filter": filtering.to_dict(),
                       "eval_length_filter": eval_filtering.to_dict(), "packing": self.packing}

    def batches(self) -> list:
        c = self.config
        return sft_batches(self.encoded, self.packing, c.micro_batch_size, c.pack_tokens,
                           self.tokenizer.pad_token_id, self.rng)

    def compute_loss(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        inputs, labels = batch
        loss, _ = completion_loss(self.engine(**_lm_inputs(inputs, self.device)).logits, labels)
        return loss, {"loss": loss.item()}

    def save(self, directory: Path, card: dict | None = None) -> None:
        save_causal_lm(directory, full_state_dict(self.engine.module, self.engine), self.engine.module.config,
                       self.tokenizer, card)

    def checkpoint(self, step: int) -> dict:
        """The weights, held-out eval loss, and `samples.jsonl`: one completion per fixed prompt."""
        with gathered(self.engine.module, self.engine):
            module = self.engine.module
            samples = generate_samples(module, self.tokenizer, self.sample_prompts, self.config, self.device)
            loss = eval_loss(module, self.eval_batches, self.device) if self.eval_batches else None
        record = super().checkpoint(step)
        if rank() == 0:  # one copy on a shared filesystem, as for the weights
            with (Path(record["dir"]) / "samples.jsonl").open("w") as handle:
                for sample in samples:
                    handle.write(json.dumps({"step": step, **sample}) + "\n")
        return record | {"eval_loss": loss, "samples": len(samples)}

    def evaluate(self) -> dict:
        """The final checkpoint (samples and eval loss of the trained weights)."""
        return {"eval_loss": self.save_checkpoint(self.total_steps)["eval_loss"]}


def train_sft(config: SFTConfig, data_path: str | Path, out_dir: str | Path,
              progress: Callable[[int], None] | None = None, log: Callable[[dict], None] | None = None) -> dict:
    """Behaviour cloning on DATA (`prompt, completion` rows, or an sft export directory)."""
    return SFTTrainer(config, data_path, out_dir, progress, log).train()
