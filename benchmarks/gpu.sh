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
# CPU against GPU (issue 13): the seed experiment on this GPU, seeds 0-4, with PyTorch's default
# TF32 (cuDNN convolutions in TF32) and with TF32 off, to set beside the CPU's numbers in
# docs/results.md (each results file records the card and its TF32 flags). Needs the data in
# $EWC_DATA_DIR (default: data/, ignored by git: copy the MNIST and Fashion-MNIST folders there and
# carry it to the machine).
export EWC_DATA_DIR="${EWC_DATA_DIR:-data}"
for tf32 in default off; do
  python - "$tf32" "$out/seed-tf32-$tf32" <<'PY' 2>&1 | tail -12 | tee "$out/seed-tf32-$tf32.txt"
import sys
import torch
from ewc.cli import main
if sys.argv[1] == "off":
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
sys.exit(main(["compare", "--config", "configs/seed-fashion-mnist-to-mnist.yaml", "--device", "cuda",
               "--strategies", "naive,ewc,kfac", "--seeds", "0,1,2,3,4", "--no-download",
               "--quiet", "--out", sys.argv[2]]))
PY
done
