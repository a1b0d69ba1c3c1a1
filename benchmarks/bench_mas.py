"""MAS importance speed: hooks and per-layer rules against the whole-model ``vmap`` path.

MNIST-sized random data (uint8 [N, 784], converted to float in [0, 1] on batch gather), the MLPs
of Split MNIST (784-400-400-10) and Permuted MNIST (784-1000-1000-10). Per model, side by side
in one process, best of ``--repeats`` interleaved runs:

- one training epoch over the same samples (plain PyTorch: forward, backward, Adam), batch 128;
- ``MAS.consolidate`` (the default: hooks, :math:`|\\delta|^\\top|a|` per Linear layer);
- the same importance by the whole-model per-sample ``vmap`` (``MAS(method="func")``), the
  path MAS took before the hook path existed.

    python benchmarks/bench_mas.py [--samples 10000] [--batch 1024] [--threads N] [--repeats 2]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ewc.models import MLP
from ewc.regularizers import MAS


def epoch(model: nn.Module, x: Tensor, y: Tensor) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    for start in range(0, len(y), 128):
        loss = F.cross_entropy(
            model(x[start : start + 128].float().div(255)), y[start : start + 128]
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def mas(model: nn.Module, batches: list[tuple[Tensor, Tensor]], method: str) -> None:
    MAS(model, lam=1.0, method=method).consolidate(batches)


def best(fn: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (args.samples, 784), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (args.samples,), generator=g)
    batches = [
        (x[s : s + args.batch].float().div(255), y[s : s + args.batch])
        for s in range(0, args.samples, args.batch)
    ]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.samples} samples, "
        f"MAS batches of {args.batch}, best of {args.repeats}"
    )
    print("| model | epoch (s) | MAS, hooks (s) | MAS, vmap (s) | hooks / epoch | vmap / hooks |")
    print("|---|---|---|---|---|---|")
    for hidden in ((400, 400), (1000, 1000)):
        torch.manual_seed(0)
        model = MLP(784, 10, hidden)
        t_epoch = best(lambda m=model: epoch(m, x, y), args.repeats)
        t_hooks = best(lambda m=model: mas(m, batches, "hooks"), args.repeats)
        t_vmap = best(lambda m=model: mas(m, batches, "func"), args.repeats)
        name = "784-" + "-".join(map(str, hidden)) + "-10"
        print(
            f"| {name} | {t_epoch:.2f} | {t_hooks:.2f} | {t_vmap:.2f} | "
            f"{t_hooks / t_epoch:.2f} | {t_vmap / t_hooks:.0f}× |"
        )


if __name__ == "__main__":
    main()
