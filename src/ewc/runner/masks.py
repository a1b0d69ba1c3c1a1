"""Which output units are active in each scenario (van de Ven et al. 2022; docs/design.md):
task-incremental trains and tests each task on its own classes, class-incremental on the classes
seen so far, domain-incremental on all outputs."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ewc.data.streams import TaskStream


def mask_logits(logits: Tensor, active: Tensor | None) -> Tensor:
    """Set the logits of inactive output units to -inf. ``active``: bool [n_outputs] or [B, n]."""
    return logits if active is None else logits.masked_fill(~active, float("-inf"))


def masked_forward(model: nn.Module, batch: tuple[Tensor, Tensor, Tensor | None]) -> tuple:
    x, y, active = batch
    return mask_logits(model(x), active), y


class Masks:
    """Which output units are active, per scenario (see docs/design.md)."""

    def __init__(self, stream: TaskStream, device: torch.device) -> None:
        n = stream.n_outputs
        rows = torch.zeros(len(stream.tasks), n, dtype=torch.bool, device=device)
        for t, task in enumerate(stream.tasks):
            rows[t, task.classes] = True
        self.rows, self.scenario = rows, stream.scenario

    def seen(self, upto: int) -> Tensor:
        return self.rows[: upto + 1].any(0)

    def train(self, stage: int, task: int) -> Tensor | None:
        if self.scenario == "task":
            return self.rows[task]
        if self.scenario == "class":
            return self.seen(stage)
        return None

    def eval(self, stage: int, task: int) -> Tensor | None:
        if self.scenario == "class":
            return self.seen(max(stage, task))
        return self.train(stage, task)
