#!/usr/bin/env bash
# Set up .venv and run every check CI runs: lint, format, type check, tests.
# Real MNIST/Fashion-MNIST tests read $EWC_DATA_DIR (default: ../shared/data) and skip without it.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
install_venv test
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
export EWC_DATA_DIR="${EWC_DATA_DIR:-$(cd .. && pwd)/shared/data}"
export MPLBACKEND=Agg
.venv/bin/python -m pytest -q "$@"
