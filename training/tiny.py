"""Tiny random-init settings for tests, smoke runs and CPU benchmarks (the real GPT-2 tokenizer, a small trunk)."""

from __future__ import annotations

import os
from pathlib import Path

# the real data beside the repository (AHF_SHARED_DATA overrides, as for the tests)
SHARED_DATA = Path(os.environ.get("AHF_SHARED_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
GPT2_TOKENIZER = SHARED_DATA / "tokenizer" / "gpt2"

TINY_GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 512}
