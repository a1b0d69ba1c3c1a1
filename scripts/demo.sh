#!/usr/bin/env bash
# Set up .venv and run the main job: the seed experiment with and without EWC, report at the end.
# Results go to runs/demo/ in the repository unless --out says otherwise; paths given and
# printed are relative to where you stand.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
(cd "$repo" && source scripts/venv.sh && install_venv cli,plots,digits)
# The project's own layout keeps the data beside the repository (as the tests do).
if [ -z "${EWC_DATA_DIR:-}" ] && [ -d "$repo/../shared/data" ]; then
  export EWC_DATA_DIR="$(cd "$repo/../shared/data" && pwd)"
fi
"$repo/.venv/bin/ewc" demo --out "$repo/runs/demo" "$@"
