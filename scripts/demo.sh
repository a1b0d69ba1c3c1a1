#!/usr/bin/env bash
# Set up .venv and run the main job: the seed experiment with and without EWC, report at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q -c constraints.txt -e .
.venv/bin/ewc demo "$@"
