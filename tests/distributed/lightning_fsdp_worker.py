"""Run by tests/test_fsdp.py under ``torchrun --nproc_per_node 2``: two tasks of Lightning
training with the EWC callback, under ``ModelParallelStrategy`` (FSDP2: ``fully_shard`` in
``configure_model``) and under DDP; each rank writes what it holds to ``$OUT/rank<r>.pt``."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, Strategy
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from ewc.integrations.lightning import EWCCallback


class Net(pl.LightningModule):
    def __init__(self, shard: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
        self.shard = shard

    def configure_model(self) -> None:
        if not self.shard or isinstance(self.net, FSDPModule):  # a later task's fit
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], index: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def two_tasks(strategy: Callable[[], Strategy], shard: bool) -> dict:
    torch.manual_seed(1)
    tasks = [TensorDataset(torch.randn(32, 6), torch.randint(0, 3, (32,))) for _ in range(2)]
    callback, model = EWCCallback(lam=10.0), Net(shard)
    for data in tasks:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=2,
            strategy=strategy(),  # a new one per Trainer
            max_epochs=1,
            callbacks=[callback],
            enable_progress_bar=False,
            enable_model_summary=False,
            logger=False,
            enable_checkpointing=False,
        )
        trainer.fit(model, DataLoader(data, batch_size=8))
    reg = callback.regularizer
    assert reg is not None

    def whole(t: Tensor) -> Tensor:
        return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()

    return {
        "weights": {n: whole(p) for n, p in model.net.named_parameters()},
        "importance_rows": {
            n: (t.to_local() if isinstance(t, DTensor) else t).shape[0]
            for n, t in reg.importance.items()
        },
        "importance": {n: whole(t) for n, t in reg.importance.items()},
        "penalty": float(reg.penalty().detach()),
    }


def main(out: str) -> None:
    fsdp = two_tasks(
        lambda: ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), True
    )
    ddp = two_tasks(DDPStrategy, False)
    rank = torch.distributed.get_rank()
    torch.save({"fsdp": fsdp, "ddp": ddp}, os.path.join(out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
