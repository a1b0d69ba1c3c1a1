"""Permuted MNIST (28×28) with 240 zero features appended AFTER the permutation: the control
for the first layer's fan-in.

    python scripts/permuted_mnist_padded.py --seed 0 --out runs/permuted-vdv/pad-naive-s0.json

van de Ven & Tolias (2019) pad MNIST to 32×32 *before* permuting (``permuted-mnist-32``), so
their MLP has 1024 inputs and each task's digit pixels land on a random subset of all 1024.
This script keeps our 784-pixel permutations and only appends 240 inputs that are always 0: the
same fan-in (PyTorch's init bound 1/√1024 instead of 1/√784), none of the scattering. Naive
fine-tuning on the domain-incremental protocol of ``configs/permuted-mnist-vandeven.yaml`` forgets
as much as unpadded (docs/results.md, Permuted MNIST): the fan-in is not what matters.
tests/test_permuted_padded.py checks the padding on a small stream.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

import ewc
from ewc.data.streams import TaskStream
from ewc.results import save_results

WIDTH = 32 * 32


def padded(stream: TaskStream, width: int = WIDTH) -> TaskStream:
    """``stream`` with every sample flattened and zero features appended up to ``width``."""

    def pad(pair: ewc.data.TensorPair) -> ewc.data.TensorPair:
        x = pair.x.reshape(len(pair.x), -1)
        zeros = torch.zeros(len(x), width - x.shape[1], dtype=x.dtype)
        return dataclasses.replace(pair, x=torch.cat([x, zeros], dim=1))

    tasks = [dataclasses.replace(t, train=pad(t.train), test=pad(t.test)) for t in stream.tasks]
    return dataclasses.replace(stream, tasks=tasks, input_shape=(width,))


def arguments(description: str) -> argparse.ArgumentParser:
    """The options of the Permuted MNIST diagnostic scripts (this one and
    ``permuted_mnist_reference.py``)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="results JSON to write")
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=5000)
    parser.add_argument("--data-dir", default=None)
    return parser


def main() -> None:
    args = arguments(__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(1)
    stream = ewc.make_stream(
        "permuted-mnist", "domain", args.tasks, data_dir=args.data_dir, seed=args.seed
    )
    config = ewc.RunConfig(
        benchmark="permuted-mnist", strategy="naive", scenario="domain", n_tasks=args.tasks,
        model="mlp", hidden=(1000, 1000), iterations=args.iterations, batch_size=128, lr=1e-4,
        optimizer="adam", seed=args.seed,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    model = ewc.MLP(WIDTH, 10, hidden=(1000, 1000))
    result = ewc.run(config, stream=padded(stream), model=model)
    save_results(result, args.out)
    final = result["accuracy_matrix"][-1]
    print(f"ACC {100 * sum(final) / len(final):.2f} -> {args.out}")


if __name__ == "__main__":
    main()
