"""Fields every trainer config shares (`RMConfig`, `SFTConfig`, `PolicyConfig` extend it)."""

from __future__ import annotations

from pydantic import BaseModel


class TrainCommon(BaseModel):
    model: str = "gpt2-xl"  # any Hugging Face model name or directory (`from_pretrained`)
    tokenizer: str | None = None  # default: the model's own (a dir with encoder.json + vocab.bpe works)
    random_init: dict | None = None  # e.g. {model_type: gpt2, n_layer: 2, n_embd: 64, n_head: 2}
    detokenize: bool = False  # WritingPrompts' `<newline>` / `[ WP ]` text
    max_length: int = 1024
    eval_fraction: float = 0.2
    seed: int = 0
    epochs: float = 1.0
    max_steps: int | None = None
    micro_batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    deepspeed: str = "zero2"  # a name in configs/deepspeed/ or a JSON path
    bf16: bool | str = "auto"
    gradient_checkpointing: bool = False
    log_every: int = 10
