"""Shared fixtures: the real data folder beside the repository, and offline settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("AHF_SHARED_DATA", REPO.parent / "shared" / "data"))

# No model hub and no telemetry on these machines; set before any test imports transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        raise RuntimeError(f"the real data folder is missing: {SHARED_DATA} (set AHF_SHARED_DATA)")
    return SHARED_DATA
