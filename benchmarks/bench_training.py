"""Runner overhead: ``ewc.run`` against a minimal hand-written PyTorch loop doing the same work.

Permuted-MNIST-sized data (uint8 [60000, 1, 28, 28] a task; random pixels, the timing does not
depend on them), MLP 784-1000-1000-10, Adam, batch 128, a fixed number of steps a task. Measured
side by side in one process, variants interleaved, medians over repeats:

- ``hand``: the minimal loop (index gather, uint8 -> float, forward, backward, Adam step), with
  ``Adam(fused=True)`` as the runner uses, and ``hand, default Adam`` with ``Adam()``'s default
  per-tensor implementation, the loop most people write;
- ``naive``: the runner's training time (``timings.train_s``: evaluation and Fisher excluded);
- ``ewc``: the same with EWC's penalty gradient after the first task (Fisher pass excluded);
- evaluation's share of a whole ``naive`` run (curves + accuracy matrix).

    python benchmarks/bench_training.py [--steps 300] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.nn import functional as F

from ewc.data.streams import stream_from_tensors
from ewc.models import MLP
from ewc.runner import RunConfig, run

N_TRAIN, N_TEST, HIDDEN = 60000, 10000, (1000, 1000)


def make_stream(n_tasks: int):
    g = torch.Generator().manual_seed(0)
    tasks = []
    for _ in range(n_tasks):
        x = torch.randint(0, 256, (N_TRAIN + N_TEST, 1, 28, 28), dtype=torch.uint8, generator=g)
        y = torch.randint(0, 10, (N_TRAIN + N_TEST,), generator=g)
        tasks.append((x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]))
    return stream_from_tensors(tasks, scenario="domain", name="permuted-mnist-sized")


def hand_loop(stream, steps: int, batch_size: int, fused: bool) -> float:
    torch.manual_seed(0)
    model = MLP(784, 10, HIDDEN)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=fused)
    g = torch.Generator().manual_seed(0)
    tic = time.perf_counter()
    for task in stream.tasks:
        x_all, y_all = task.train.x, task.train.y
        order = torch.randperm(len(y_all), generator=g)
        for s in range(steps):
            idx = order[s * batch_size : (s + 1) * batch_size]
            x = x_all[idx].float().div_(255)
            loss = F.cross_entropy(model(x), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return time.perf_counter() - tic


def runner(stream, strategy: str, steps: int, batch_size: int) -> dict:
    cfg = RunConfig(
        benchmark="permuted-mnist",
        strategy=strategy,
        model="mlp",
        hidden=HIDDEN,
        iterations=steps,
        batch_size=batch_size,
        lr=1e-4,
        lam=100.0,
        fisher_samples=1000,
    )
    return run(cfg, stream=stream)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per task")
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    stream = make_stream(args.tasks)
    runner(stream, "naive", 20, args.batch_size)  # warm-up
    times: dict[str, list[float]] = {
        "hand, default Adam": [],
        "hand": [],
        "naive": [],
        "ewc": [],
        "eval share": [],
    }
    for _ in range(args.repeats):
        times["hand, default Adam"].append(hand_loop(stream, args.steps, args.batch_size, False))
        times["hand"].append(hand_loop(stream, args.steps, args.batch_size, True))
        naive = runner(stream, "naive", args.steps, args.batch_size)
        times["naive"].append(naive["timings"]["train_s"])
        times["eval share"].append(naive["timings"]["eval_s"] / naive["timings"]["total_s"])
        times["ewc"].append(
            runner(stream, "ewc", args.steps, args.batch_size)["timings"]["train_s"]
        )
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.tasks} tasks x "
        f"{args.steps} steps, batch {args.batch_size}, MLP 784-1000-1000-10, "
        f"median of {args.repeats}"
    )
    print("| variant | training time (s) | ratio |")
    print("|---|---|---|")
    slow = med["hand, default Adam"]
    print(f"| hand-written loop, default Adam | {slow:.2f} | {slow / med['hand']:.3f} × hand |")
    print(f"| minimal hand-written loop, fused Adam | {med['hand']:.2f} | 1.00 (floor) |")
    print(f"| runner, naive | {med['naive']:.2f} | {med['naive'] / med['hand']:.3f} × hand |")
    print(
        f"| runner, ewc (penalty gradient) | {med['ewc']:.2f} | "
        f"{med['ewc'] / med['naive']:.3f} × naive |"
    )
    print(f"evaluation share of a naive run: {100 * med['eval share']:.1f} %")


if __name__ == "__main__":
    main()
