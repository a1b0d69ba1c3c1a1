"""Cost of the EWC penalty in a training step, with 1 and with 50 consolidated tasks.

A 784-400-400-10 MLP, Adam, batch 128, random data in memory. Per round, every variant takes
one full step (zero_grad, forward, backward, optimizer.step) on the same model, in a rotating
order; the table reports the median step time over the rounds after warm-up and the median of
the per-round ratios to the unregularized step of the same round (paired, so slow drifts of a
shared machine cancel).

Variants: ``none``; ``penalty()`` (autograd path: ``loss + reg.penalty()``);
``add_penalty_grad()`` (closed-form gradient added to ``.grad`` after backward). Tasks are
consolidated with ``add_task`` and random Fishers/anchors: the step cost does not depend on how
the importance was computed, and by construction not on the number of tasks either.

    .venv/bin/python benchmarks/bench_penalty.py [--rounds 600] [--warmup 50] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ewc.regularizers import EWC


def make_reg(model: nn.Module, n_tasks: int, seed: int) -> EWC:
    g = torch.Generator().manual_seed(seed)
    reg = EWC(model, lam=100.0)
    for _ in range(n_tasks):
        fisher = {n: torch.rand(p.shape, generator=g) * 1e-3 for n, p in model.named_parameters()}
        anchor = {
            n: p.detach() + 0.01 * torch.randn(p.shape, generator=g)
            for n, p in model.named_parameters()
        }
        reg.add_task(fisher, anchor)
    return reg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=600)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 400), nn.ReLU(), nn.Linear(400, 10)
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(64 * 128, 784)
    y = torch.randint(0, 10, (64 * 128,))
    regs = {1: make_reg(model, 1, seed=1), 50: make_reg(model, 50, seed=2)}

    def step(i: int, reg: EWC | None, path: str) -> None:
        rows = slice((i % 64) * 128, (i % 64 + 1) * 128)
        optimizer.zero_grad(set_to_none=True)
        loss: Tensor = nn.functional.cross_entropy(model(x[rows]), y[rows])
        if reg is not None and path == "autograd":
            loss = loss + reg.penalty()
        loss.backward()
        if reg is not None and path == "grad":
            reg.add_penalty_grad()
        optimizer.step()

    variants: dict[tuple[str, int], Callable[[int], None]] = {
        ("none", 0): lambda i: step(i, None, "")
    }
    for n_tasks, reg in regs.items():
        variants[("penalty()", n_tasks)] = lambda i, r=reg: step(i, r, "autograd")
        variants[("add_penalty_grad()", n_tasks)] = lambda i, r=reg: step(i, r, "grad")

    names = list(variants)
    times: dict[tuple[str, int], list[float]] = {k: [] for k in names}
    for r in range(args.warmup + args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for k in order:
            tic = time.perf_counter()
            variants[k](r)
            elapsed = time.perf_counter() - tic
            if r >= args.warmup:
                times[k].append(elapsed)

    base = times[("none", 0)]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs "
        f"({platform.machine()}); {args.rounds} rounds after {args.warmup} warm-up"
    )
    print("| variant | tasks | median step (ms) | ratio to none |")
    print("|---|---|---|---|")
    for (name, n_tasks), ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, base, strict=True))
        tasks = "-" if n_tasks == 0 else str(n_tasks)
        print(f"| {name} | {tasks} | {1e3 * statistics.median(ts):.3f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
