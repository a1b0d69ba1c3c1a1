"""Fisher estimation speed: ``fisher_diagonal`` against a training epoch and a per-sample loop.

MNIST-sized data (uint8 [60000, 784] random pixels and labels; the timing does not depend on
the values), converted to float in [0, 1] on batch gather, as in training. Two models from
``ewc.models``:

- ``MLP(784, 10, (400, 400))``: 784-400-400-10, ReLU;
- ``SimpleCNN()``, the seed's CNN: Conv2d(1,32,3,p=1)+ReLU+MaxPool2d(2),
  Conv2d(32,64,3,p=1)+ReLU+MaxPool2d(2), Flatten, Linear(3136,768)+ReLU, Linear(768,10).

Per model, measured side by side in one process after a warm-up on a small subset:

- one training epoch: plain PyTorch loop (index gather, forward, backward, Adam step), batch 128;
- ``fisher_diagonal`` over the same samples (hooks, the default method), in batches of
  ``--fisher-batch`` (default 1024): empirical for both models; exact for the MLP, also with
  the passes' Σδ² grouping switched off (one Linear matmul per class instead of one per batch);
- ``method="loop"`` (the per-sample reference) on the first ``--loop-samples`` samples,
  extrapolated linearly to all samples; for the empirical kind also a minimal hand-written
  per-sample loop (no argument checks; about 1.5x faster than ``method="loop"``).

Every measurement runs ``--repeats`` times, interleaved, and the best is kept (the noise of a
shared machine only adds time). ``--quick``: 6000 samples, 200 in the loop.

    python benchmarks/bench_fisher.py [--quick] [--threads N] [--fisher-batch 1024] [--repeats 2]
        [--models mlp,cnn]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ewc.fisher import _util, fisher_diagonal
from ewc.models import MLP, SimpleCNN

# (model, measurement) -> the target, as a bound on the ratio to one epoch; the MLP's Fisher
# must also be MIN_LOOP_SPEEDUP times faster than the per-sample loop.
TARGETS = {("mlp", "empirical"): 1.5, ("mlp", "exact"): 12.0, ("cnn", "empirical"): 3.0}
MIN_LOOP_SPEEDUP = 20.0


def gather(x: Tensor, idx: Tensor | slice) -> Tensor:
    return x[idx].float().div_(255)


def train_epoch(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 128) -> None:
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    for start in range(0, len(y), batch_size):
        idx = order[start : start + batch_size]
        loss = F.cross_entropy(model(gather(x, idx)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def batches(x: Tensor, y: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    for start in range(0, len(y), batch_size):
        rows = slice(start, start + batch_size)
        yield gather(x, rows), y[rows]


def hand_loop(model: nn.Module, x: Tensor, y: Tensor, m: int) -> None:
    """A minimal hand-written per-sample empirical Fisher (no checks), for comparison."""
    model.eval()
    params = list(model.parameters())
    sums = [torch.zeros_like(p) for p in params]
    for i in range(m):
        log_p = torch.log_softmax(model(gather(x, slice(i, i + 1))), 1)[0, y[i]]
        for s, g in zip(sums, torch.autograd.grad(log_p, params), strict=True):
            s.addcmul_(g, g)


@contextmanager
def one_matmul_per_pass() -> Iterator[None]:
    """Ablation: hand the rules one backward pass at a time (no Σδ² before the Linear matmul)."""
    saved = _util.MEMORY_BUDGET_BYTES
    _util.MEMORY_BUDGET_BYTES = 1
    try:
        yield
    finally:
        _util.MEMORY_BUDGET_BYTES = saved


def seconds(fn: Callable[[], object]) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


def bench(
    name: str, model: nn.Module, x: Tensor, y: Tensor, args: argparse.Namespace
) -> list[tuple[str, str, float, float | None, float]]:
    """Rows ``(model, measurement, seconds, extrapolated loop seconds, epoch seconds)``."""
    n, m = len(y), args.loop_samples

    def fisher(kind: str, n_samples: int | None = None, method: str = "auto") -> None:
        size = args.fisher_batch if method != "loop" else m
        fisher_diagonal(model, batches(x, y, size), kind, n_samples=n_samples, method=method)

    def ablation() -> None:
        with one_matmul_per_pass():
            fisher("exact")

    kinds = ["empirical", "exact"] if name == "mlp" else ["empirical"]
    runs: dict[str, Callable[[], None]] = {"epoch": lambda: train_epoch(model, x, y)}
    for kind in kinds:
        runs[kind] = partial(fisher, kind)
        runs[f"loop {kind}"] = partial(fisher, kind, m, "loop")
    runs["loop hand"] = partial(hand_loop, model, x, y, m)
    if name == "mlp":
        runs["exact, one matmul per class (ablation)"] = ablation

    train_epoch(model, x[:1024], y[:1024])  # warm-up: every code path once, on a small subset
    for kind in kinds:
        fisher(kind, n_samples=1024)
        fisher(kind, n_samples=8, method="loop")
    times: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(args.repeats):  # interleaved, best of the repeats
        for label, run in runs.items():
            times[label].append(seconds(run))
    best = {label: min(t) for label, t in times.items()}
    epoch = best.pop("epoch")
    rows: list[tuple[str, str, float, float | None, float]] = [
        (name, f"train epoch (Adam, batch 128, {n} samples)", epoch, None, epoch)
    ]
    best["hand"] = best["empirical"]  # the same fast run, against the hand-written loop
    for label, secs in best.items():
        if not label.startswith("loop"):
            loop = best.get(f"loop {label}")
            what = "empirical, against a minimal hand-written loop" if label == "hand" else label
            rows.append((name, what, secs, loop * n / m if loop else None, epoch))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6000 samples, 200 in the loop")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--fisher-batch", type=int, default=1024, help="batch of the Fisher pass")
    parser.add_argument("--loop-samples", type=int, default=None, help="default 1000 (quick 200)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats; best is kept")
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated subset of mlp,cnn")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = 6000 if args.quick else 60000
    args.loop_samples = args.loop_samples or (200 if args.quick else 1000)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.machine()}); {n} samples; Fisher batch "
        f"{args.fisher_batch}; loop on {args.loop_samples} samples, extrapolated to {n}; "
        f"best of {args.repeats} interleaved repeats"
    )
    rows = []
    models: dict[str, Callable[[], nn.Module]] = {
        "mlp": lambda: MLP(784, 10, (400, 400)),
        "cnn": SimpleCNN,
    }
    for name, make in models.items():
        if name not in args.models.split(","):
            continue
        torch.manual_seed(0)
        rows += bench(name, make(), x, y, args)

    print()
    print(
        "| model | measurement | seconds | × epoch | per-sample loop (s, extrapolated) "
        "| loop / fast | target | met |"
    )
    print("|---|---|---:|---:|---:|---:|---|---|")
    for name, what, secs, loop, epoch in rows:
        ratio = secs / epoch
        target = TARGETS.get((name, what))
        speedup = loop / secs if loop else None
        goal, met = "", ""
        if target is not None:
            goal = f"≤ {target:g}× epoch"
            ok = ratio <= target
            if name == "mlp":
                goal += f", ≥ {MIN_LOOP_SPEEDUP:g}× loop"
                ok = ok and speedup is not None and speedup >= MIN_LOOP_SPEEDUP
            met = "yes" if ok else "NO"
        loop_s = f"{loop:.1f}" if loop else ""
        speed = f"{speedup:.0f}×" if speedup else ""
        print(
            f"| {name} | {what} | {secs:.2f} | {ratio:.2f} | {loop_s} | {speed} | {goal} | {met} |"
        )


if __name__ == "__main__":
    main()
