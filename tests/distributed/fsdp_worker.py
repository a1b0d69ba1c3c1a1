"""Run by tests/test_fsdp.py under ``torchrun --nproc_per_node 2``: an FSDP2 (``fully_shard``)
model's Fisher, penalties, training steps against DDP, a sharded checkpoint and bad input; each
rank writes what it holds to ``$OUT/rank<r>.pt`` (rank 0 also ``full.pt`` and ``ckpt/``)."""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.nn import functional as F

import ewc
from ewc.fsdp import full_state_dict
from ewc.regularizers import KFAC, make_regularizer

LR = 0.1


def sharded(model: nn.Module) -> nn.Module:
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def step(model: nn.Module, reg, opt, batch, path: str) -> None:
    x, y = batch
    loss = F.cross_entropy(model(x), y)
    if path == "autograd":
        loss = loss + reg.penalty()
    opt.zero_grad()
    loss.backward()
    if path == "grad":
        reg.add_penalty_grad()
    opt.step()
    if path == "proximal":
        reg.proximal_step(LR)
    reg.after_step()


def train(model: nn.Module, strategy: str, path: str, tasks: list[list[tuple]]) -> dict:
    """Two tasks of SGD steps with ``strategy``, consolidating after the first."""
    reg = make_regularizer(strategy, model, lam=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for t, batches in enumerate(tasks):
        for batch in batches:
            step(model, reg, opt, batch, path)
        if t == 0:
            reg.consolidate(batches)
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters()}  # fmt: skip


def error(action: Callable[[], object]) -> str:
    try:
        action()
    except ValueError as e:
        return str(e)
    return ""


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same model and data on every rank
    # 5 and 3 output rows: uneven shards (3 + 2 and 2 + 1 rows).
    base = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    # Unequal shards of the data in the same number of batches (an FSDP forward is a
    # collective): rank 0 gets 24 samples in batches of 8, rank 1 gets 16 in 6, 6, 4.
    lo, hi, size = (0, 24, 8) if rank == 0 else (24, 40, 6)
    mine = [(x[i : min(i + size, hi)], y[i : min(i + size, hi)]) for i in range(lo, hi, size)]
    everything = [(x, y)]
    kinds = ("exact", "empirical")
    single = {k: ewc.fisher_diagonal(base, everything, kind=k, distributed=False) for k in kinds}
    ref = ewc.EWC(copy.deepcopy(base), lam=10.0, distributed=False)
    ref.consolidate(everything)
    ref_rewrite = ewc.EWC(copy.deepcopy(base), lam=10.0, normalize="rewrite", distributed=False)
    ref_rewrite.consolidate(everything)
    mas_single = ewc.MAS(base, lam=1.0, distributed=False).task_importance(everything)

    model = sharded(copy.deepcopy(base))
    shards = {
        k: {n: f.to_local() for n, f in ewc.fisher_diagonal(model, mine, kind=k).items()}
        for k in kinds
    }
    reg = ewc.EWC(model, lam=10.0)
    reg.consolidate(mine)
    rewrite = ewc.EWC(model, lam=10.0, normalize="rewrite")
    rewrite.consolidate(mine)
    mas = ewc.MAS(model, lam=1.0)
    mas.consolidate(mine)
    with torch.no_grad():
        for p, q in zip(model.parameters(), ref.model.parameters(), strict=True):
            p.to_local().add_(0.1)
            q.add_(0.1)
    penalty, penalty_single = reg.penalty().detach(), ref.penalty().detach()

    # The regularizer's state: sharded checkpoint (each rank writes its shard) and one file.
    dcp.save(reg.state_dict(), checkpoint_id=os.path.join(out, "ckpt"))
    resumed = ewc.EWC(model, lam=1.0)
    state = resumed.state_dict()
    dcp.load(state, checkpoint_id=os.path.join(out, "ckpt"))
    resumed.load_state_dict(state)
    full = full_state_dict(reg)
    if rank == 0:
        torch.save(full, os.path.join(out, "full.pt"))
    from_full = ewc.EWC(model, lam=1.0)
    from_full.load_state_dict(full)

    # A few training steps: FSDP + regularizer against DDP + regularizer, equal local batches.
    own = [[(x[8 * rank + i : 8 * rank + i + 4], y[8 * rank + i : 8 * rank + i + 4])]
           for i in (0, 16)]  # fmt: skip
    tasks = [own[0] * 2, own[1] * 3]
    runs = {}
    for strategy, path in [
        ("ewc", "autograd"),
        ("ewc", "grad"),
        ("online-ewc", "grad"),
        ("mas", "grad"),
        ("si", "grad"),
        ("l2", "proximal"),
    ]:
        ddp = nn.parallel.DistributedDataParallel(copy.deepcopy(base))
        runs[f"{strategy}/{path}"] = (
            train(ddp, strategy, path, tasks),
            train(sharded(copy.deepcopy(base)), strategy, path, tasks),
        )

    # Bad input, each answered by one ValueError line.
    before = copy.deepcopy(base)
    early = ewc.EWC(before, lam=1.0)
    sharded(before)
    consolidated = copy.deepcopy(base)
    done = ewc.EWC(consolidated, lam=1.0)
    done.consolidate(mine)
    sharded(consolidated)
    one_rank = init_device_mesh("cpu", (2, 1), mesh_dim_names=("ranks", "one"))["one"]
    elsewhere = full_state_dict(reg)
    elsewhere["importance"] = {
        n: DTensor.from_local(t, one_rank, [Shard(0)]) for n, t in elsewhere["importance"].items()
    }
    errors = {
        "built_before": error(early.penalty),
        "sharded_after_consolidate": error(done.penalty),
        "world_size": error(lambda: resumed.load_state_dict(elsewhere)),
        "kfac": error(lambda: KFAC(model, lam=1.0)),
        "func": error(lambda: ewc.fisher_diagonal(model, mine, method="func")),
    }
    torch.save(
        {
            "shards": shards,
            "single": single,
            "importance": {n: t.to_local() for n, t in reg.importance.items()},
            "mas": {n: t.to_local() for n, t in mas.importance.items()},
            "rewrite": {n: t.to_local() for n, t in rewrite.importance.items()},
            "rewrite_single": dict(ref_rewrite.importance),
            "stats": (reg.stats[0], rewrite.stats[0]),
            "stats_single": (ref.stats[0], ref_rewrite.stats[0]),
            "mas_single": mas_single,
            "penalty": penalty,
            "penalty_single": penalty_single,
            "penalty_resumed": resumed.penalty().detach(),
            "penalty_from_full": from_full.penalty().detach(),
            "runs": runs,
            "errors": errors,
        },
        os.path.join(out, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
