"""One training loop for every trainer (rm, sft, dpo, rloo), shaped like TRL's `Trainer`.

An algorithm is a small subclass of `Trainer` that sets `self.model` and supplies

- `batches()`: one epoch of micro-batches, in training order (called again for every epoch);
- `compute_loss(batch) -> (loss, stats)`: the loss to back-propagate and a dict of float stats;
- `save(directory, card)`: the model as its users load it (`card` goes into `ahf_model.json`);

and may override `evaluate()` (held-out figures after training, merged into the result), `log(entry)`
(add keys to a log line), `checkpoint(step)`, `on_train_begin()` and `batch_tokens(batch)`.

The loop owns the rest: the DeepSpeed engine and schedule (`training.engine.start_engine`), gradient
accumulation (DeepSpeed steps the optimizer every `grad_accum` micro-steps), the logging window,
`metrics.jsonl` in the output directory, checkpoints every `save_every` steps, the progress callback
(one tick per micro-step) and throughput.

Logging window: every `log_every` optimizer steps, and at the last one, one entry holds `step`,
`micro_step`, the mean of each stat over the micro-steps since the previous entry, `lr`, and the
window's `tokens_per_s` (real, non-padding tokens through the trained model), `flops_per_s` and `mfu`.
`metrics.jsonl` gets one JSON line per entry, one `{"checkpoint": ...}` line per checkpoint and one
`{"eval": ...}` line after training. `report_to` sends the same entries to TensorBoard and / or Weights &
Biases as well (`Trackers`).

Several ranks (a `deepspeed` / `torchrun` launch, training.launch): data parallel. Every rank builds the same
epoch (same seed); rank r trains on batches r, r + W, r + 2W, ... (W the world size; the epoch is padded
by repeating its first batches to a multiple of W, as torch's DistributedSampler does), so the schedule
counts ceil(batches / W) micro-steps per epoch. Rank 0 alone writes: metrics.jsonl (its own window:
`tokens_per_s` and `mfu` are per rank), the model, checkpoints and the card; `save()` runs on rank 0 only,
the other ranks joining the ZeRO-3 gather it starts (`full_state_dict`: the one collective a `save()` may
use), then every rank waits at a barrier, so that an `evaluate()` reading the saved model back finds it
(the output directory is on a filesystem every node shares).

MFU as nanoGPT's `estimate_mfu`: flops per token = 6N + 12·L·H·Q·T, N the parameters a token is
multiplied through (`matmul_params`), L layers, H heads, Q head size, T = `max_length` (so the attention
term is an upper bound for shorter rows); achieved flops/s = flops per token × tokens/s; MFU = that /
`peak_flops` (the config field, else the GPU's bf16 dense peak by name; unknown: `mfu` is null).
Work outside the trained forward and backward (a reference model, sampling, scoring) is not counted.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ahf.console import UserError
from training import data as D
from training.engine import barrier, gathered, rank, start_engine, world_size, zero_stage
from training.models import position_limit, update_card

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # bf16 dense tensor-core peaks, by GPU name


def device_peak_flops() -> float | None:
    """The bf16 dense peak of the current GPU when its name is known; None on the CPU or an unknown GPU."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def matmul_params(model: nn.Module) -> int:
    """nanoGPT's N: every parameter except the embedding tables (a lookup costs no matmul), but counting
    the token embedding when the output layer reuses it (tied weights, as GPT-2's LM head)."""
    tables = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = id(output.weight) if output is not None else None
    return sum(p.numel() for p in model.parameters() if id(p) not in tables or id(p) == tied)


def flops_per_token(model_config, n_params: int, seq_len: int) -> int:
    """6N + 12·L·H·Q·T (PaLM appendix B, as nanoGPT's estimate_mfu): forward and backward of one token."""
    layers, heads = model_config.num_hidden_layers, model_config.num_attention_heads
    head_size = model_config.hidden_size // heads
    return 6 * n_params + 12 * layers * heads * head_size * seq_len


def row_counts(train: list, held: list) -> dict:
    """Rows and distinct prompts on each side of a split."""
    return {"train_rows": len(train), "eval_rows": len(held), "train_prompts": len({r.prompt for r in train}),
            "eval_prompts": len({r.prompt for r in held})}


class Window:
    """The micro-steps since the last log line: their stats, real tokens and wall time."""

    def __init__(self):
        self.stats: list[dict[str, float]] = []
        self.tokens = 0
        self.started = time.perf_counter()

    def add(self, stats: dict[str, float], tokens: int) -> None:
        self.stats.append(stats)
        self.tokens += tokens

    def close(self) -> tuple[dict[str, float], int, float]:
        """(mean of each stat over the micro-steps that reported it, tokens, seconds); then starts afresh."""
        keys = dict.fromkeys(k for s in self.stats for k in s)
        means = {k: sum(s[k] for s in self.stats if k in s) / sum(k in s for s in self.stats) for k in keys}
        result = (means, self.tokens, time.perf_counter() - self.started)
        self.__init__()
        return result


class Trackers:
    """Where log entries go besides metrics.jsonl (`report_to`), the way TRL's trainers report: one writer per
    tracker, opened when training starts (rank 0 only) and closed when it ends. Every number of an entry is a
    scalar at its optimizer step: `train/<stat>` (nested dicts flattened, `train/accuracy_by_task/NAME`), and
    the evaluation after training as `eval/<figure>` at the last step (`eval/accuracy`, `eval/loss`, ...).

    - tensorboard: `torch.utils.tensorboard` event files in OUT/tensorboard/ (those of an earlier run into the
      same OUT are replaced, as metrics.jsonl is), the config as text; `tensorboard --logdir OUT`.
    - wandb: a Weights & Biases run in OUT/wandb/, offline unless WANDB_MODE says otherwise (`wandb sync`
      uploads it later), project WANDB_PROJECT (default `ahf`), named after OUT, the config as its config.
    """

    PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # report_to name -> the package it needs

    def __init__(self, report_to: list[str] = (), out_dir: Path | None = None, config=None):
        self.tensorboard = self.wandb = None
        settings = config.model_dump(mode="json") if config is not None else {}
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            folder = out_dir / "tensorboard"
            for stale in folder.glob("events.out.tfevents.*"):
                stale.unlink()
            self.tensorboard = SummaryWriter(log_dir=str(folder))
            self.tensorboard.add_text("config", "    " + json.dumps(settings, indent=2).replace("\n", "\n    "))
        if "wandb" in report_to:
            import wandb

            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "ahf"), name=out_dir.name,
                                    dir=str(out_dir), mode=os.environ.get("WANDB_MODE", "offline"), config=settings)

    @classmethod
    def check(cls, report_to: list[str]) -> None:
        """Refuse a tracker whose package is not installed, before anything is written."""
        import importlib.util

        for name in report_to:
            if importlib.util.find_spec(cls.PACKAGES[name]) is None:
                raise UserError(f"report_to lists {name}, but the {cls.PACKAGES[name]} package is not installed: "
                                f"pip install {cls.PACKAGES[name]} (or leave {name} out of report_to)")

    @staticmethod
    def scalars(entry: dict, prefix: str, top: bool = True) -> dict[str, float]:
        """The finite numbers of `entry`, nested dicts flattened: {"prefix/key/inner": value}. A top-level key
        that only repeats the prefix (`eval` under eval) or starts with it (`eval_loss`) is named without it."""
        out = {}
        for key, value in entry.items():
            key = str(key).removeprefix(f"{prefix}_") if top else str(key)
            name = prefix if top and key == prefix else f"{prefix}/{key}"
            if isinstance(value, dict):
                out |= Trackers.scalars(value, name, top=False)
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                out[name] = float(value)
        return out

    def log(self, scalars: dict[str, float], step: int) -> None:
        if self.tensorboard is not None:
            for tag, value in scalars.items():
                self.tensorboard.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.tensorboard = self.wandb = None


class Trainer:
    """The loop; subclasses supply the model, batches, loss and saving (see the module docstring)."""

    def __init__(self, config, out_dir: str | Path, progress: Callable[[int], None] | None = None,
                 log: Callable[[dict], None] | None = None):
        self.config = config
        self.out_dir = Path(out_dir)  # made when training starts: a refused run leaves nothing behind
        self.progress, self.log_callback = progress, log
        self.model: nn.Module | None = None
        self.engine: Any = None
        self.data: dict = {}  # lineage: the data file or export the model was trained on (ahf_model.json)
        self.facts: dict = {}  # what the subclass knows of its data (rows, length filter ...) for the result
        self.history: list[dict] = []
        self.checkpoints: list[dict] = []
        self._metrics = None
        self.trackers = Trackers()  # report_to's writers, while training runs (Trackers)
        self.rank, self.world = rank(), world_size()  # a launcher's, else 0 of 1

    # ------------------------------------------------------------------ what a subclass supplies
    def batches(self) -> list:
        raise NotImplementedError

    def compute_loss(self, batch) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def save(self, directory: Path, card: dict | None = None) -> None:
        raise NotImplementedError

    def batch_tokens(self, batch) -> int:
        """Real (non-padding) tokens the trained model reads for `batch` (called after its `compute_loss`).
        The default reads batches that are (training.tokens.Batch, targets) pairs, as rm and sft make."""
        return batch[0].real_tokens

    def on_train_begin(self) -> None:
        """Called once the engine exists (`self.engine`, `self.device`), before the first step."""

    def evaluate(self) -> dict:
        """Held-out figures after training (the weights are saved by then); merged into the result."""
        return {}

    def card(self) -> dict:
        return {"train_config": self.config.model_dump(), "data": self.data}

    def log(self, entry: dict) -> None:
        self.history.append(entry)
        self.write_metrics(entry)
        stats = {k: v for k, v in entry.items() if k not in ("step", "micro_step")}
        self.trackers.log(Trackers.scalars(stats, "train"), entry["step"])
        if self.log_callback:
            self.log_callback(entry)

    def checkpoint(self, step: int) -> dict:
        directory = self.out_dir / f"checkpoint-{step}"
        self.save_model(directory)
        return {"step": step, "dir": str(directory)}

    def read(self, source: D.Source, load: Callable, eval_path: str | Path | None = None) -> tuple[list, list]:
        """Training and held-out rows of `source` (`training.data.held_out`); records lineage and counts."""
        c = self.config
        train, held, how = D.held_out(source, eval_path, load, c.detokenize, c.eval_fraction, c.seed)
        self.data = source.data | {"eval": how}
        self.facts = row_counts(train, held) | {"eval_source": how}
        return train, held

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        self._check_positions()
        Trackers.check(self.config.report_to)
        epoch = self.batches()
        if not epoch:
            raise UserError("no training batches: the training data is empty after filtering")
        epoch = self.shard(epoch)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.flops_per_token = flops_per_token(self.model.config, matmul_params(self.model), self.config.max_length)
        self.peak_flops = self.config.peak_flops or device_peak_flops()
        self.engine, self.ds_config, total_micro, self.total_steps = start_engine(self.model, self.config, len(epoch))
        self.device = self.engine.device
        path = self.out_dir / "metrics.jsonl" if self.rank == 0 else os.devnull  # one writer
        with open(path, "w") as self._metrics:
            if self.rank == 0:  # one writer per tracker, as for metrics.jsonl
                self.trackers = Trackers(self.config.report_to, self.out_dir, self.config)
            try:
                self.on_train_begin()
                started = time.perf_counter()
                tokens = self._fit(epoch, total_micro)
                self.train_seconds = time.perf_counter() - started
                self.save_model(self.out_dir, self.card())
                evaluation = self.evaluate()
                if evaluation:
                    self.write_metrics({"eval": evaluation})
                    self.trackers.log(Trackers.scalars(evaluation, "eval"), self.total_steps)
            finally:
                self.trackers.close()
        result = self._summary(tokens, total_micro) | evaluation
        if self.rank == 0:
            update_card(self.out_dir, {"train_result": result})
        return {**result, "history": self.history, "out_dir": str(self.out_dir)}

    def shard(self, epoch: list) -> list:
        """This rank's batches of an epoch: every W-th from its rank on, after padding the epoch to a
        multiple of W with its first batches (every rank steps as often; torch's DistributedSampler pads so)."""
        if self.world == 1:
            return epoch
        total = math.ceil(len(epoch) / self.world) * self.world
        padded = (epoch * math.ceil(total / len(epoch)))[:total]
        return padded[self.rank::self.world]

    def save_model(self, directory: Path, card: dict | None = None) -> None:
        """`save()` on rank 0 only (one writer per file); under ZeRO-3 the other ranks join the gather it
        starts. Then every rank waits until the files are written."""
        if self.rank == 0:
            self.save(directory, card)
        elif zero_stage(self.engine) == 3:
            with gathered(self.engine.module, self.engine):  # the collective; rank 0 copies and writes
                pass
        barrier()

    def _check_positions(self) -> None:
        """A row longer than the backbone's positions fails deep in its embedding (IndexError): say so first."""
        limit = position_limit(getattr(self.model, "backbone", self.model))
        if limit is not None and self.config.max_length > limit:
            raise UserError(f"max_length={self.config.max_length} is more than the {limit} positions of "
                            f"{self.config.model!r}: set max_length={limit} or less (--set max_length={limit})")

    def _fit(self, epoch: list, total_micro: int) -> int:
        """Micro-steps until `total_micro`, a new epoch of batches whenever one runs out; returns real tokens."""
        micro, tokens, window = 0, 0, Window()
        self.engine.train()
        while True:
            for batch in epoch:
                loss, stats = self.compute_loss(batch)
                self.engine.backward(loss)
                self.engine.step()
                micro += 1
                count = self.batch_tokens(batch)
                window.add(stats, count)
                tokens += count
                if self.progress:
                    self.progress(1)
                if micro % self.config.grad_accum == 0:
                    self._after_step(micro // self.config.grad_accum, micro, window)
                if micro == total_micro:
                    return tokens
            epoch = self.shard(self.batches())

    def _after_step(self, step: int, micro: int, window: Window) -> None:
        if step % self.config.log_every == 0 or step == self.total_steps:
            stats, tokens, seconds = window.close()
            tokens_per_s = tokens / max(seconds, 1e-9)
            flops_per_s = self.flops_per_token * tokens_per_s
            self.log({"step": step, "micro_step": micro, **stats, "lr": self.engine.get_lr()[0],
                      "tokens_per_s": tokens_per_s, "flops_per_s": flops_per_s,
                      "mfu": flops_per_s / self.peak_flops if self.peak_flops else None})
        if self.config.save_every and step % self.config.save_every == 0 and step < self.total_steps:
            paused = time.perf_counter()
            self.save_checkpoint(step)
            window.started += time.perf_counter() - paused  # tokens/s counts training time only

    def save_checkpoint(self, step: int) -> dict:
        record = self.checkpoint(step)
        self.checkpoints.append(record)
        self.write_metrics({"checkpoint": record})
        return record

    def write_metrics(self, line: dict) -> None:
        self._metrics.write(json.dumps(line, default=str) + "\n")
        self._metrics.flush()

    def _summary(self, tokens: int, total_micro: int) -> dict:
        tokens_per_s = tokens / max(self.train_seconds, 1e-9)
        zero = self.ds_config.get("zero_optimization", {}).get("stage")
        return {**self.facts, "steps": self.total_steps, "micro_steps": total_micro,
                "train_seconds": round(self.train_seconds, 2), "tokens_per_s": round(tokens_per_s, 1),
                "flops_per_token": self.flops_per_token,
                "mfu": self.flops_per_token * tokens_per_s / self.peak_flops if self.peak_flops else None,
                "deepspeed": {"config": self.config.deepspeed, "zero_stage": zero,
                              "bf16": self.ds_config.get("bf16", {}).get("enabled", False), "world_size": self.world},
                **({"checkpoints": self.checkpoints} if self.checkpoints else {})}
