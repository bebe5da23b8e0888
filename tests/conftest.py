"""Shared fixtures: the real data folder beside the repository, offline settings, and the tiers.

Two tiers (tests/README.md): a test that reads the real data (the `shared_data` fixture, directly or
through another fixture) is in the real-data tier, marked `slow` here, as are long runs marked by
hand (the wheel install); everything else is the fast tier, which needs no ../shared.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Ray's driver installs a SIGSEGV handler over the JVM's when Lucene (pyserini) started first in this process,
# and the JVM takes SIGSEGV for its own null checks: a later Lucene call then crashes the test session. Ray
# reads this once, when it is first imported, so it is set before any test imports it (ahf.engine does too).
os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("AHF_SHARED_DATA", REPO.parent / "shared" / "data"))

# No model hub and no telemetry on these machines; set before any test imports transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        raise RuntimeError(f"the real data folder is missing: {SHARED_DATA} (set AHF_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def _torch_extensions_dir(tmp_path_factory):
    # DeepSpeed JIT-compiles ops into this folder; keep it per test session, not in the home dir
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(tmp_path_factory.mktemp("torch_extensions")))


@pytest.fixture(scope="session")
def tokenizer(shared_data):
    """The real GPT-2 BPE tokenizer from the shared files (offline)."""
    from training.models import load_tokenizer

    return load_tokenizer(str(shared_data / "tokenizer" / "gpt2"))


@pytest.fixture(scope="session")
def labelled_real(shared_data, tmp_path_factory):
    """A factory: (name, shared file, LabelConfig or None) -> (store dir, label report) of a fresh
    store that holds that file ingested, its turns built and labelled."""
    from feedback.labels import label_store
    from mining.ingest import ingest

    def build(name: str, source: str, config=None):
        store = tmp_path_factory.mktemp(name) / "store"
        assert ingest([shared_data / source], store).ok  # (and its turns)
        return store, label_store(store, config)

    return build


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster per test session (2 CPUs, on loopback), shut down at the end;
    ahf.engine.RayEngine uses an already-initialised Ray as it is."""
    import ray  # the scale extra (ray[data]), installed by scripts/setup.sh
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a private instance on loopback: no token to manage
    from ahf.engine import keep_signal_handlers

    with keep_signal_handlers():  # the JVM's SIGSEGV handler stays first (ahf.engine)
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
                 _node_ip_address="127.0.0.1")
    try:
        yield ray
    finally:
        ray.shutdown()


# Debian's chromium (scripts/setup.sh installs it): `playwright install` cannot download a browser here.
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    """A real headless Chromium per test module (Playwright's sync loop lives only as long), driven by Playwright (test_report, test_serve)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()
