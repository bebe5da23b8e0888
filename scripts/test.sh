#!/usr/bin/env bash
# Run the test suite (sets up the environment first if needed). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${AHF_VENV:-.venv}/bin/python" -m pytest -q "$@"
