#!/usr/bin/env bash
# Set up .venv and run the main job: the seed experiment with and without EWC, report at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q -c constraints.txt -e ".[cli,plots,digits]"
# The project's own layout keeps the data beside the repository (as the tests do).
if [ -z "${EWC_DATA_DIR:-}" ] && [ -d ../shared/data ]; then
  export EWC_DATA_DIR="$(cd ../shared/data && pwd)"
fi
.venv/bin/ewc demo "$@"
