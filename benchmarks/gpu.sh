#!/usr/bin/env bash
# Everything a session lent a GPU should measure, in one run (the device tool's machine has torch
# with CUDA, so no install): the `cuda` test group and the GPU benchmarks, each output saved under
# $OUT (default runs/gpu). Record the results, with the card's name, in docs/benchmarks.md.
#   OUT=/some/dir bash benchmarks/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-runs/gpu}"
mkdir -p "$out"
export PYTHONPATH=src MPLBACKEND=Agg
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/card.txt"
python -m pytest -m cuda -q tests/ 2>&1 | tail -15 | tee "$out/cuda-tests.txt"
python benchmarks/bench_step.py --device cuda --compile 2>&1 | tee "$out/bench_step.txt"
python benchmarks/bench_fisher_transformer.py --device cuda 2>&1 | tee "$out/bench_fisher_transformer.txt"
