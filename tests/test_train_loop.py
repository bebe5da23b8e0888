"""training.loop on the real DeepSpeed engine (CPU): exact window means over accumulated micro-steps, the
metrics.jsonl lines, checkpoints, and nanoGPT's FLOPs-per-token formula against hand-counted parameters."""

from __future__ import annotations

import json

import pytest
import torch

from training.config import TrainCommon
from training.loop import Trainer, device_peak_flops, flops_per_token, matmul_params
from training.models import MODEL_CARD, RewardModel, build_backbone
from training.tiny import TINY_GPT2

# TINY_GPT2 by hand: a block = 2 layer norms (2 x 64) + c_attn (32 x 96 + 96) + attn c_proj (32 x 32 + 32)
# + c_fc (32 x 128 + 128) + mlp c_proj (128 x 32 + 32) = 12,704; two blocks + ln_f (64) = 25,472.
BLOCKS = 2 * 12_704 + 64
WTE = 50_257 * 32  # the token embedding; GPT-2's LM head reuses it (one matmul per token)
ATTENTION_AT_64 = 12 * 2 * 2 * 16 * 64  # 12 L H Q T: 2 layers, 2 heads of 16, T = 64


class CountingTrainer(Trainer):
    """Micro-step i (1, 2, ...) reports x = i, and `odd` = i on odd micro-steps only; 7 real tokens each.
    An epoch is 3 micro-batches, so a run of 10 micro-steps crosses epochs mid-window."""

    def __init__(self, config, out_dir, **callbacks):
        super().__init__(config, out_dir, **callbacks)
        torch.manual_seed(0)
        self.model = build_backbone("tiny", TINY_GPT2, causal_lm=True, attn_implementation="sdpa")
        self.micro, self.epochs, self.saved = 0, 0, []

    def batches(self) -> list:
        self.epochs += 1
        return [torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262]])] * 3

    def batch_tokens(self, batch) -> int:
        return batch.numel()

    def compute_loss(self, batch):
        self.micro += 1
        ids = batch.to(self.device)
        loss = self.engine(input_ids=ids, labels=ids).loss
        return loss, {"x": float(self.micro)} | ({"odd": float(self.micro)} if self.micro % 2 else {})

    def save(self, directory, card=None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / MODEL_CARD).write_text(json.dumps(card or {}))
        self.saved.append(directory.name)


def test_logging_window_means_checkpoints_and_metrics_file(tmp_path):
    config = TrainCommon(model="tiny", random_init=TINY_GPT2, max_steps=5, grad_accum=2, log_every=2, save_every=3,
                         deepspeed="zero0", lr=1e-3, warmup_ratio=0.0, max_length=64, peak_flops=1e12)
    ticks, logged = [], []
    trainer = CountingTrainer(config, tmp_path / "run", progress=ticks.append, log=logged.append)
    result = trainer.train()
    assert (result["steps"], result["micro_steps"], trainer.micro, trainer.epochs) == (5, 10, 10, 4)
    assert len(ticks) == 10 and logged == result["history"]
    # logged at optimizer steps 2 and 4 (log_every) and 5 (the last): micro-steps 1-4, 5-8, 9-10
    history = result["history"]
    assert [(h["step"], h["micro_step"]) for h in history] == [(2, 4), (4, 8), (5, 10)]
    assert [h["x"] for h in history] == [2.5, 6.5, 9.5]
    assert [h["odd"] for h in history] == [2.0, 6.0, 9.0]  # the mean over the micro-steps that reported it
    assert result["flops_per_token"] == 6 * (BLOCKS + WTE) + ATTENTION_AT_64
    for h in history:
        assert h["tokens_per_s"] > 0 and h["lr"] > 0
        assert h["flops_per_s"] == pytest.approx(result["flops_per_token"] * h["tokens_per_s"])
        assert h["mfu"] == pytest.approx(h["flops_per_s"] / 1e12)
    assert result["mfu"] == pytest.approx(result["flops_per_token"] * result["tokens_per_s"] / 1e12, rel=1e-2)
    # checkpoint at step 3 only (the last step is the final model), then the final save
    assert trainer.saved == ["checkpoint-3", "run"]
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines == [history[0], {"checkpoint": result["checkpoints"][0]}, history[1], history[2]]
    assert result["checkpoints"] == [{"step": 3, "dir": str(tmp_path / "run" / "checkpoint-3")}]
    card = json.loads((tmp_path / "run" / MODEL_CARD).read_text())
    assert card["train_config"]["grad_accum"] == 2 and card["train_result"]["steps"] == 5


def test_flops_per_token_is_nanogpt_formula_for_tiny_gpt2():
    torch.manual_seed(0)
    lm = build_backbone("tiny", TINY_GPT2, causal_lm=True, attn_implementation="sdpa")
    assert matmul_params(lm) == BLOCKS + WTE  # tied LM head counted once, position table left out
    assert flops_per_token(lm.config, matmul_params(lm), 64) == 6 * (BLOCKS + WTE) + ATTENTION_AT_64 == 9_851_328
    rm = RewardModel(build_backbone("tiny", TINY_GPT2, attn_implementation="sdpa"))
    assert matmul_params(rm) == BLOCKS + 33  # no LM head: the embedding tables cost no matmul; head 32 + 1
    assert flops_per_token(rm.config, matmul_params(rm), 128) == 6 * (BLOCKS + 33) + 2 * ATTENTION_AT_64
    if not torch.cuda.is_available():  # the CPU has no known peak: mfu stays null unless peak_flops is set
        assert device_peak_flops() is None


class EvaluatingTrainer(CountingTrainer):
    """CountingTrainer with an evaluation after training, shaped as the reward model's."""

    def evaluate(self) -> dict:
        return {"eval": {"pairs": 4, "accuracy": 0.75, "truncation": {"total": 4, "dropped": {}}}}


def _tracked_config(report_to: list[str]) -> TrainCommon:
    return TrainCommon(model="tiny", random_init=TINY_GPT2, max_steps=5, grad_accum=2, log_every=2,
                       deepspeed="zero0", lr=1e-3, warmup_ratio=0.0, max_length=64, report_to=report_to)


def test_report_to_tensorboard_writes_every_logged_scalar(tmp_path):
    """report_to: [tensorboard]: the event file, read back by TensorBoard's own reader, holds each log line's
    stats at its optimizer step (`train/...`) and the evaluation at the last step (`eval/...`)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    (out / "tensorboard").mkdir(parents=True)
    (out / "tensorboard" / "events.out.tfevents.0.earlier-run").write_bytes(b"")  # replaced, as metrics.jsonl is
    result = EvaluatingTrainer(_tracked_config(["tensorboard"]), out).train()
    (event_file,) = (out / "tensorboard").glob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"train/x", "train/odd", "train/lr", "train/tokens_per_s",
                                             "train/flops_per_s", "eval/pairs", "eval/accuracy",
                                             "eval/truncation/total"}  # mfu is null on the CPU: left out
    history = result["history"]
    for stat in ("x", "odd", "lr", "tokens_per_s", "flops_per_s"):
        logged = events.Scalars(f"train/{stat}")
        assert [e.step for e in logged] == [h["step"] for h in history] == [2, 4, 5]
        assert [e.value for e in logged] == pytest.approx([h[stat] for h in history], rel=1e-6)
    assert [(e.step, e.value) for e in events.Scalars("eval/accuracy")] == [(5, 0.75)]
    assert "config/text_summary" in events.Tags()["tensors"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[:-1] == history  # metrics.jsonl as ever


def test_report_to_wandb_runs_offline_or_says_what_to_install(tmp_path, monkeypatch):
    import importlib.util

    from ahf.console import UserError

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    if importlib.util.find_spec("wandb") is None:  # an optional package: the run is refused before it writes
        with pytest.raises(UserError, match=r"report_to lists wandb, but the wandb package is not installed: "
                                            r"pip install wandb"):
            CountingTrainer(_tracked_config(["wandb"]), out).train()
        assert not out.exists()
        return
    result = CountingTrainer(_tracked_config(["wandb"]), out).train()
    (run,) = (out / "wandb").glob("offline-run-*")  # offline by default: nothing leaves the machine
    assert list(run.glob("*.wandb")) and result["steps"] == 5
