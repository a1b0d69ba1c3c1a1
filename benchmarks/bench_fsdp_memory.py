"""Memory of EWC on an FSDP2 model: the regularizer's state per rank, the peak of consolidate.

A 54.6M-parameter MLP (1024-4096-4096-4096-4096-10, ReLU; float32, 218 MB of parameters),
Adam, EWC with the empirical Fisher of 128 samples a rank (4 batches of 32). Run it in one
process, then under torchrun with FSDP2 (each Linear one ``fully_shard`` unit, then the root)::

    OMP_NUM_THREADS=1 python benchmarks/bench_fsdp_memory.py
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/bench_fsdp_memory.py

Each rank prints one JSON line: the bytes of the regularizer's state it holds (importance +
anchor, this rank's shards), and the resident memory (RSS, sampled every millisecond by a
thread) above the level before the phase, at its peak, for one training step (forward,
backward with the penalty's gradient, Adam step) and for ``consolidate``. RSS is what the
operating system counts, allocator caches included: the numbers are upper bounds of what the
tensors need, comparable between the two runs on the same machine.

``--state-dtype bfloat16`` stores the importance and anchor in bfloat16 (``EWC(...,
state_dtype=torch.bfloat16)``) and also reports the penalty's relative error against a float32
state consolidated on the same batches, after 20 Adam steps (lr 1e-4) on other data.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

import ewc
from ewc.fsdp import local

WIDTHS = (1024, 4096, 4096, 4096, 4096, 10)
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    """This process's resident memory in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


@contextmanager
def peak_above_start() -> Iterator[list[int]]:
    """Yields a list that holds, on exit, the peak RSS above the RSS at entry (bytes)."""
    result: list[int] = []
    start, peak, done = rss(), [rss()], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        done.set()
        thread.join()
        result.append(max(peak[0], rss()) - start)


def measure(action: Callable[[], object]) -> int:
    with peak_above_start() as peak:
        action()
    return peak[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--state-dtype", choices=("float32", "bfloat16"), default="float32")
    state_dtype = getattr(torch, parser.parse_args().state_dtype)
    torch.manual_seed(0)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(WIDTHS):
        layers += [nn.Linear(a, b), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    n_params = sum(p.numel() for p in model.parameters())
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    reg = ewc.EWC(model, lam=1.0, fisher="empirical", state_dtype=state_dtype)
    batches = [(torch.randn(32, WIDTHS[0]), torch.randint(0, 10, (32,))) for _ in range(4)]

    def train_step() -> None:
        x, y = batches[0]
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        reg.add_penalty_grad()
        optimizer.step()

    train_step()  # Adam's state and the allocator's first pages, outside the measurements
    reg.consolidate(batches[:1])
    consolidate = measure(lambda: reg.consolidate(batches))
    step = measure(train_step)
    state = sum(local(t).nbytes for t in [*reg.importance.values(), *reg.anchor.values()])
    error = None
    if state_dtype != torch.float32:  # one task's state in both dtypes, 20 steps, both penalties
        low, exact = (
            ewc.EWC(model, lam=1.0, fisher="empirical", state_dtype=d) for d in (state_dtype, None)
        )
        for r in (low, exact):
            r.consolidate(batches)
        for _ in range(20):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(
                model(torch.randn(32, WIDTHS[0])), torch.randint(0, 10, (32,))
            ).backward()
            optimizer.step()
        error = abs(float(low.penalty()) / float(exact.penalty()) - 1)
    print(
        json.dumps(
            {
                "state_dtype": str(state_dtype).removeprefix("torch."),
                "world": world,
                "rank": dist.get_rank() if world > 1 else 0,
                "parameters": n_params,
                "state_bytes_this_rank": state,
                "train_step_peak_bytes": step,
                "consolidate_peak_bytes": consolidate,
                "penalty_relative_error": error,
            }
        ),
        flush=True,
    )
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
