#!/usr/bin/env bash
# Run the tests (sets up the environment first if needed), tier by tier (tests/README.md):
# the fast tier with the real data hidden, to prove it needs none, then the real-data tier.
# Extra arguments go to both pytest runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY="${AHF_VENV:-.venv}/bin/python"
echo "== fast tier (no ../shared)"
AHF_SHARED_DATA=/nonexistent/ahf-shared-data "$PY" -m pytest -q -m "not slow" "$@"
echo "== real-data tier (../shared/data) and the wheel install"
"$PY" -m pytest -q -m slow "$@"
