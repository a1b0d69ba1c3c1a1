"""EWC's training step against plain training, on the benchmarks' own models, CPU or GPU.

Two models as the runner trains them: the Permuted MNIST MLP 784-1000-1000-10 (batch 128) and the
seed notebook's CNN (conv 32 -> conv 64 -> fc 768 -> 10, batch 512), Adam with PyTorch's fused
kernel (``fused=True``, as the runner builds it) where the device has one, random data in the
device's memory. One step = zero_grad, forward, cross-entropy, backward, the penalty, optimizer
step. Variants, all on one model and optimizer, one step each per round in a rotating order; the
ratio is the median over rounds of (variant step / naive step of the same round), so drifts of a
shared machine cancel. On a GPU every step is synchronized before the clock is read.

- ``naive``: no penalty (the floor).
- ``ewc: add_penalty_grad, per-tensor`` / ``foreach``: the closed-form gradient
  ``p.grad += λΩ̄(θ-θ̄)`` after backward, with θ-θ̄ formed per tensor into a kept buffer (the
  CPU default) or by one multi-tensor kernel (``reg.foreach = True``, the GPU default).
- ``ewc: loss + penalty()``: the autograd path.
- with ``--compile``: ``naive, compiled loss`` (forward and loss through ``torch.compile``) and
  ``ewc, compiled loss + penalty()``, where AOTAutograd puts the penalty's gradient into the
  compiled backward graph, next to each parameter's own gradient.

    python benchmarks/bench_step.py [--device cuda] [--models mlp,cnn] [--rounds 300]
        [--threads 1] [--compile]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from bench_penalty import make_reg
from torch import Tensor, nn

from ewc.models import MLP, SimpleCNN

MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], int]] = {
    "mlp": (lambda: MLP(784, 10, (1000, 1000)), (784,), 128),
    "cnn": (lambda: SimpleCNN(), (1, 28, 28), 512),
}


def adam(model: nn.Module) -> torch.optim.Optimizer:
    try:
        return torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    except (RuntimeError, TypeError):  # no fused kernel for this device
        return torch.optim.Adam(model.parameters(), lr=1e-4)


def measure(name: str, device: torch.device, rounds: int, warmup: int, compile_: bool) -> None:
    build, shape, batch = MODELS[name]
    torch.manual_seed(0)
    model = build().to(device)
    optimizer = adam(model)
    reg = make_reg(model, 1, seed=1)  # the step cost does not depend on the number of tasks
    x = torch.rand(8 * batch, *shape, device=device)
    y = torch.randint(0, 10, (8 * batch,), device=device)

    def loss_of(rows: slice, with_penalty: bool) -> Tensor:
        loss = nn.functional.cross_entropy(model(x[rows]), y[rows])
        return loss + reg.penalty() if with_penalty else loss

    compiled = torch.compile(loss_of) if compile_ else loss_of

    def step(i: int, penalty: str) -> None:
        rows = slice((i % 8) * batch, (i % 8 + 1) * batch)
        optimizer.zero_grad(set_to_none=True)
        if penalty in ("compiled", "compiled naive"):
            loss = compiled(rows, penalty == "compiled")
        else:
            loss = loss_of(rows, penalty == "autograd")
        loss.backward()
        if penalty in ("per-tensor", "foreach"):
            reg.foreach = penalty == "foreach"
            reg.add_penalty_grad()
        optimizer.step()

    variants = {
        "naive": "none",
        "ewc: add_penalty_grad, per-tensor": "per-tensor",
        "ewc: add_penalty_grad, foreach": "foreach",
        "ewc: loss + penalty()": "autograd",
    }
    if compile_:
        variants["naive, compiled loss"] = "compiled naive"
        variants["ewc, compiled loss + penalty()"] = "compiled"
    names = list(variants)
    times: dict[str, list[float]] = {k: [] for k in names}
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for r in range(warmup + rounds):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            sync()
            tic = time.perf_counter()
            step(r, variants[k])
            sync()
            if r >= warmup:
                times[k].append(time.perf_counter() - tic)
    params = sum(p.numel() for p in model.parameters())
    print(f"\n{name}: {params / 1e6:.2f}M parameters, batch {batch}, {type(optimizer).__name__}")
    print("| variant | median step (ms) | ratio to naive |")
    print("|---|---:|---:|")
    for k, ts in times.items():
        ratio = statistics.median(t / b for t, b in zip(ts, times["naive"], strict=True))
        print(f"| {k} | {1e3 * statistics.median(ts):.3f} | {ratio:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated: mlp, cnn")
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--compile", action="store_true", help="add torch.compile'd variants")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    print(
        f"torch {torch.__version__}, {device.type} ({where}), {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs; {args.rounds} rounds after {args.warmup} warm-up"
    )
    for name in args.models.split(","):
        measure(name, device, args.rounds, args.warmup, args.compile)


if __name__ == "__main__":
    main()
