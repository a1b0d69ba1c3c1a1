"""FSDP2 (``torch.distributed.fsdp.fully_shard``): the regularizer state and the Fisher on shards.

After ``fully_shard``, a model's parameters are ``DTensor``\\ s sharded along dim 0 over the
ranks of a one-dimensional device mesh (``Shard(0)``; uneven sizes allowed, a rank's shard may
be empty). A regularizer built on such a model keeps its importance and anchor as ``DTensor``\\ s
with the same layout, so each rank holds only its shard (1/world of the state), and does all
its arithmetic on the local tensors (:func:`local`); scalars that sum over every element (the
penalty, the merged constant, counts of bad values) are all-reduced (:func:`sum_over_ranks`)
so that every rank sees the same value.

The Fisher is computed by the hooks while FSDP has the layer unsharded (inside forward and
backward), summed over this rank's samples as full-shape tensors, and then reduce-scattered
(:func:`shard_of`) to each rank's shard: no step gathers the full Fisher or the full model.

These helpers are no-ops on ordinary tensors, so the code paths of unsharded models are
unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

__all__ = [
    "check_sharding",
    "full",
    "full_state_dict",
    "gathered",
    "is_sharded",
    "local",
    "shard_of",
    "sum_over_ranks",
]


def is_sharded(t: object) -> bool:
    """Whether ``t`` is a ``DTensor`` (a parameter of a ``fully_shard``-ed model)."""
    return isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """This rank's part of ``t``: ``t.to_local()`` for a ``DTensor`` (a view: in-place changes
    change ``t``; differentiable), ``t`` itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


def check_sharding(params: Iterable[Tensor], what: str) -> bool:
    """Whether ``params`` are FSDP shards, raising ``ValueError`` unless every ``DTensor`` among
    them is sharded along dim 0 over one one-dimensional mesh (FSDP2's layout; HSDP's 2-D mesh
    and tensor parallelism are not supported) and the ordinary tensors are none or all."""
    params = list(params)
    sharded = [p for p in params if isinstance(p, DTensor)]
    if not sharded:
        return False
    meshes = {p.device_mesh for p in sharded}
    placements = {tuple(p.placements) for p in sharded}
    if len(meshes) > 1 or placements != {(Shard(0),)}:
        found = sorted({str(pl) for pl in placements})
        raise ValueError(
            f"{what} supports FSDP2 parameters sharded along dim 0 over one 1-D device mesh "
            f"(fully_shard); found placements {found} on {len(meshes)} mesh(es). Use "
            "fully_shard(module) without HSDP or tensor parallelism."
        )
    if len(sharded) != len(params):
        raise ValueError(
            f"{what}: {len(params) - len(sharded)} of the {len(params)} trainable parameters "
            "are not sharded by fully_shard. Apply fully_shard to the model itself too (its "
            "root), so that every parameter is sharded."
        )
    return True


def shard_of(full: Tensor, like: Tensor, reduce: bool) -> DTensor:
    """This rank's shard, in the layout of ``like`` (a ``DTensor``), of a full-shape tensor that
    every rank holds: the sum over ranks (``reduce=True``: one reduce-scatter) or this rank's
    own values (``reduce=False``: a slice, no communication)."""
    assert isinstance(like, DTensor)
    mesh = like.device_mesh
    placement = Partial() if reduce else Replicate()
    spread = DTensor.from_local(full, mesh, [placement] * mesh.ndim, run_check=False)
    return spread.redistribute(mesh, like.placements)


def sum_over_ranks(values: Tensor, like: Iterable[Tensor], op: Any = None) -> Tensor:
    """``values`` (any tensor) summed (or reduced by ``op``, a ``dist.ReduceOp``) over the ranks
    of the mesh of the first ``DTensor`` in ``like``, in place; unchanged when ``like`` holds
    none. Every rank must call it."""
    mesh = next((t.device_mesh for t in like if isinstance(t, DTensor)), None)
    if mesh is not None:
        dist.all_reduce(values, op=dist.ReduceOp.SUM if op is None else op, group=mesh.get_group())
    return values


def summed(numbers: list[float], like: Iterable[Tensor], op: Any = None) -> list[float]:
    """``numbers`` (per-shard counts or sums, in float64) summed (or reduced by ``op``) over
    ranks when ``like`` holds a ``DTensor``, else as they are. Every rank must call it."""
    sharded = [t for t in like if isinstance(t, DTensor)]
    if not sharded:
        return [float(v) for v in numbers]
    values = torch.tensor(numbers, dtype=torch.float64, device=sharded[0].device)
    return [float(v) for v in sum_over_ranks(values, sharded, op).tolist()]


def as_layout(t: Tensor, like: Tensor) -> Tensor:
    """``t`` (a full-shape tensor or a ``DTensor`` of ``like``'s shape) in ``like``'s device,
    dtype and layout: a full tensor given for a ``DTensor`` ``like`` is sliced to this rank's
    shard (every rank holds the same full tensor: a saved single-process state, a full Fisher).
    Raises ``ValueError`` for a ``DTensor`` on a mesh of another size than ``like``'s, or for a
    ``DTensor`` given for an ordinary tensor."""
    if not isinstance(like, DTensor):
        if isinstance(t, DTensor):
            raise ValueError(
                "a sharded (DTensor) state for an unsharded model: gather it with "
                "ewc.fsdp.full_state_dict(reg) under torchrun first, or load it into the "
                "fully_shard-ed model."
            )
        return t.detach().to(like)
    if not isinstance(t, DTensor):
        return shard_of(t.detach().to(device=like.device, dtype=like.dtype), like, reduce=False)
    if t.device_mesh.size() != like.device_mesh.size():
        raise ValueError(
            f"a state sharded over {t.device_mesh.size()} ranks for a model sharded over "
            f"{like.device_mesh.size()}: world sizes differ. Save and load it with "
            "torch.distributed.checkpoint (which reshards), or through "
            "ewc.fsdp.full_state_dict(reg)."
        )
    return DTensor.from_local(
        local(t).detach().to(device=like.device, dtype=like.dtype),
        like.device_mesh,
        like.placements,
        shape=like.shape,
        stride=like.stride(),
        run_check=False,
    )


def full(t: Tensor) -> Tensor:
    """``t`` whole: a ``DTensor`` all-gathered (every rank must call it), else ``t``."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state_dict(regularizer: Any) -> dict[str, Any]:
    """``regularizer.state_dict()`` with every sharded tensor gathered into one ordinary tensor
    (an all-gather per tensor: every rank must call it; every rank gets the result). Save it on
    rank 0 with ``torch.save`` for a single-device run: ``load_state_dict`` of an unsharded
    regularizer reads it, and so does a sharded one of any world size (each rank keeps its
    slice)."""
    state: dict[str, Any] = gathered(regularizer.state_dict())
    return state


def gathered(value: Any) -> Any:
    """``value`` (a tensor, or dicts of them and other values) with every ``DTensor`` gathered
    (:func:`full`); every rank must call it when it holds any."""
    if isinstance(value, Tensor):
        return full(value)
    if isinstance(value, Mapping):
        return {k: gathered(v) for k, v in value.items()}
    return value
