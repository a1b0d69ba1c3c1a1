"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2``: each rank consolidates
an unequal shard of one data set, then writes what it holds to ``$OUT/rank<r>.pt``."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import ewc
from ewc.regularizers import KFAC


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same model and data on every rank
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y = torch.randn(50, 6), torch.randint(0, 4, (50,))
    # Unequal shards: rank 0 gets 36 samples in batches of 8 (the last one 4), rank 1 gets 14.
    lo, hi = (0, 36) if rank == 0 else (36, 50)
    shard = [(x[i : min(i + 8, hi)], y[i : min(i + 8, hi)]) for i in range(lo, hi, 8)]
    everything = [(x, y)]

    fisher = {k: ewc.fisher_diagonal(model, shard, kind=k) for k in ("exact", "empirical")}
    local = ewc.fisher_diagonal(model, shard, distributed=False)
    single = {k: ewc.fisher_diagonal(model, everything, kind=k, distributed=False) for k in fisher}

    ddp = nn.parallel.DistributedDataParallel(model)
    reg = ewc.EWC(ddp, lam=10.0)  # regularizes ddp.module
    reg.consolidate(shard)
    mas = ewc.MAS(model, lam=1.0)
    mas.consolidate(shard)
    mas_single = ewc.MAS(model, lam=1.0, distributed=False).task_importance(everything)
    ddp_fisher = ewc.fisher_diagonal(ddp, shard)
    kfac, kfac_single = KFAC(model, lam=1.0), KFAC(model, lam=1.0, distributed=False)
    kfac.consolidate(shard)
    kfac_single.consolidate(everything)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    torch.save(
        {
            "fisher": fisher,
            "local": local,
            "single": single,
            "ddp_fisher": ddp_fisher,
            "importance": reg.importance,
            "penalty": reg.penalty().detach(),
            "mas": mas.importance,
            "mas_single": mas_single,
            "kfac": kfac.importance,
            "kfac_single": kfac_single.importance,
        },
        os.path.join(out, f"rank{rank}.pt"),
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
