"""Small helpers: memory budgets for per-sample intermediates, summing partials, eval mode."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import Tensor, nn

T = TypeVar("T")

MEMORY_BUDGET_BYTES = 256 * 2**20
"""Rough cap, in bytes, on the per-sample tensors one rule materialises at a time."""

CACHE_CHUNK_BYTES = 2 * 2**20
"""On a CPU, chunks of per-sample intermediates this small stay in cache between the matmul
that makes them and the square and sum that read them (measured: a transformer's Linear rule
2.3x faster than with :data:`MEMORY_BUDGET_BYTES` chunks, docs/benchmarks.md)."""


def chunk_budget(device: torch.device) -> int:
    """Bytes of per-sample intermediates per chunk: cache-sized on a CPU; on a GPU, where each
    chunk costs kernel launches, :data:`MEMORY_BUDGET_BYTES`."""
    return CACHE_CHUNK_BYTES if device.type == "cpu" else MEMORY_BUDGET_BYTES


def sample_chunks(
    n: int, bytes_per_sample: int, budget: int = MEMORY_BUDGET_BYTES
) -> Iterator[slice]:
    """Slices of ``range(n)`` holding about ``budget`` bytes each (at least one sample)."""
    step = max(1, budget // max(1, bytes_per_sample))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def byte_groups(items: Iterable[T], nbytes: Callable[[T], int]) -> Iterator[list[T]]:
    """Consecutive groups of ``items`` of at most :data:`MEMORY_BUDGET_BYTES` (at least 1 item)."""
    group: list[T] = []
    size = 0
    for item in items:
        b = nbytes(item)
        if group and size + b > MEMORY_BUDGET_BYTES:
            yield group
            group, size = [], 0
        group.append(item)
        size += b
    if group:
        yield group


def accumulate(sums: dict[str, Tensor], part: dict[str, Tensor]) -> None:
    """``sums[name] += part[name]`` for every name, inserting missing names."""
    for name, value in part.items():
        sums[name] = sums[name] + value if name in sums else value


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` inside; every submodule's own ``training`` flag restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
