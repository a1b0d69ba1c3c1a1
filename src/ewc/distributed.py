"""Data-parallel training under ``torchrun``: the process group, shards of each batch, rank 0.

``torchrun --nproc_per_node N -m ewc run ...`` starts N processes with ``WORLD_SIZE``, ``RANK``
and ``LOCAL_RANK`` set. :func:`setup` joins them into the default process group (gloo on a
CPU, nccl on CUDA, one GPU per process); the runner then wraps the model in
``DistributedDataParallel`` -- or, with ``parallel="fsdp"``, shards it with FSDP2's
``fully_shard`` (:func:`wrap`) --, gives each rank a slice of every global batch
(:func:`shard`), and lets only rank 0 write files (:func:`is_main_process`). Outside torchrun
all of this is a no-op.
"""

from __future__ import annotations

import atexit
import os
import sys

import torch
import torch.distributed as dist
from torch import Tensor, nn


def active() -> bool:
    """Whether a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if active() else 0


def world_size() -> int:
    """The number of processes (1 outside a process group)."""
    return dist.get_world_size() if active() else 1


def is_main_process() -> bool:
    """True on rank 0 and outside a process group: the process that writes files."""
    return rank() == 0


def note(text: str) -> None:
    """Print ``text`` to stderr as a note, on rank 0 only (every rank would say the same)."""
    if is_main_process():
        print(f"note: {text}", file=sys.stderr)


def launched() -> bool:
    """Whether this process was started by torchrun with several processes (``WORLD_SIZE`` >
    1), before or after :func:`setup`."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available()


def setup(device: torch.device) -> torch.device:
    """Under torchrun (``WORLD_SIZE`` > 1), initialise the default process group if nobody has
    (backend nccl for CUDA, gloo otherwise) and return this process's device (``cuda`` becomes
    ``cuda:LOCAL_RANK``); otherwise return ``device`` unchanged."""
    if not launched():
        return device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        atexit.register(dist.destroy_process_group)
    return device


def wrap(model: nn.Module, parallel: str = "ddp") -> nn.Module:
    """In a process group of several processes, ``DistributedDataParallel(model)``
    (``parallel="ddp"``), or ``model`` itself sharded in place by FSDP2 (``"fsdp"``: each direct
    child holding parameters is one ``fully_shard`` unit, all-gathered only while it runs, then
    the root); else ``model``. Gradients are averaged over ranks during ``backward()``. Build the
    optimizer and the regularizer afterwards: ``fully_shard`` replaces the parameters."""
    if not active():
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for child in model.children():
            if any(p.requires_grad for p in child.parameters()):
                fully_shard(child)
        fully_shard(model)
        return model
    device = next(model.parameters()).device
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def consolidation_batches(order: Tensor, batch_size: int) -> list[Tensor]:
    """This rank's batches of the sample indices ``order``: ``order.split(batch_size)`` in one
    process; under torchrun its contiguous part (:func:`shard`) in as many near-equal batches as
    every other rank (at most ``batch_size`` each), since under FSDP every forward is a
    collective that all ranks must take together."""
    if not active():
        return list(order.split(batch_size))
    largest = -(-len(order) // world_size())
    mine = shard(order)
    return list(mine.tensor_split(max(1, -(-largest // batch_size)))) if len(mine) else [mine]


def shard(indices: Tensor) -> Tensor:
    """This rank's contiguous part of a global batch of sample indices (sizes differ by at most
    one; a rank may get none when the batch has fewer samples than there are ranks)."""
    return indices.tensor_split(world_size())[rank()] if active() else indices
