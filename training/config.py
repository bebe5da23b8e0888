"""Fields every trainer config shares. `RMConfig`, `SFTConfig`, `DPOConfig` and `RLOOConfig` extend
`TrainCommon`; each shipped `configs/train/<name>.yaml` holds exactly its model's defaults."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ahf.config import StageConfig


class TrainCommon(StageConfig):
    """Model, data, schedule, engine and logging settings of every `ahf train` verb."""

    model: str = Field("gpt2-xl", description="any Hugging Face model name or directory (`from_pretrained`)")
    tokenizer: str | None = Field(None, description="tokenizer name or directory (default: the model's own; "
                                                    "a directory with GPT-2's encoder.json + vocab.bpe works offline)")
    random_init: dict | None = Field(None, description="a fresh model of this config instead of pretrained weights, "
                                                       "e.g. {model_type: gpt2, n_layer: 2, n_embd: 64, n_head: 2}")
    detokenize: bool = Field(False, description="undo WritingPrompts tokenisation (`<newline>`, `[ WP ]`, ` n't`)")
    max_length: int = Field(1024, description="tokens per sequence (prompt + reply); also T of the MFU formula")
    eval_fraction: float = Field(0.2, description="share of the training prompts held out for evaluation when "
                                                  "the data brings no held-out rows (an export's validation split)")
    seed: int = Field(0, description="seeds the model init, the held-out split and the batch order")
    epochs: float = Field(1.0, description="passes over the training rows (ignored when max_steps is set)")
    max_steps: int | None = Field(None, description="optimizer steps to train for (None: from epochs)")
    micro_batch_size: int = Field(4, description="rows per micro-step (padded layouts)")
    grad_accum: int = Field(1, description="micro-steps per optimizer step")
    lr: float = Field(1e-5, description="peak learning rate (linear warm-up, then linear decay to 0)")
    weight_decay: float = Field(0.0, description="AdamW weight decay")
    warmup_ratio: float = Field(0.03, description="share of the optimizer steps spent warming up")
    deepspeed: str = Field("zero2", description="a name in configs/deepspeed/ (zero0 ... zero3_offload) or a JSON path")
    bf16: bool | Literal["auto"] = Field("auto", description="bf16 weights and compute; auto: when the GPU supports it")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass")
    log_every: int = Field(10, description="optimizer steps per log line (metrics.jsonl, stderr); the last step "
                                           "is always logged")
    save_every: int | None = Field(None, description="optimizer steps between checkpoints (`checkpoint-<step>/`); "
                                                     "None: only the final model")
    peak_flops: float | None = Field(None, description="the device's peak FLOP/s for MFU; None: looked up by GPU name "
                                                       "(H100/H200 989e12, A100 312e12, bf16 dense), else MFU is null")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="where log lines go besides metrics.jsonl, as TRL's report_to: tensorboard "
        "(event files in OUT/tensorboard/), wandb (Weights & Biases, a run in OUT/wandb/, offline unless WANDB_MODE "
        "says otherwise; needs `pip install wandb`); [] for metrics.jsonl only")
