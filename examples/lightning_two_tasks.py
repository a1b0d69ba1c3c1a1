"""Continual fine-tuning with a Lightning ``Trainer``: task A, then task B, with and without EWC.

A tiny BERT built from a config (no downloads), all its weights trained, learns the two toy
tasks of ``toy_text_tasks.py`` one after the other. The same ``EWCCallback`` goes to both
``fit`` calls: it consolidates after task A and holds what A needs during task B. Offline, on
CPU, in about 20 s on 2 cores (mostly imports)::

    python examples/lightning_two_tasks.py [--lam 1e5] [--seed 0]

prints task A's test accuracy after A and after B, and task B's after B (in %), for naive
fine-tuning and for EWC.
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from toy_text_tasks import TokenTask, accuracy, tiny_bert

from ewc.integrations.lightning import EWCCallback


class Classifier(L.LightningModule):
    """A Hugging Face sequence classifier trained with cross-entropy and Adam."""

    def __init__(self, net: nn.Module, lr: float) -> None:
        super().__init__()
        self.net, self.lr = net, lr

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Logits ``[N, 2]`` of a batch of ``input_ids`` ``[N, T]``."""
        return self.net(input_ids=batch["input_ids"]).logits

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return nn.functional.cross_entropy(self(batch), batch["labels"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def logits_and_labels(module: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """How the callback feeds a batch to the module for the Fisher: ``[N, 2]`` logits, labels."""
    return module(batch), batch["labels"]


def quiet_trainer(callbacks: list, **options: Any) -> L.Trainer:
    """A CPU ``lightning.Trainer`` without logger, checkpoints, progress bar or model summary;
    ``options`` add or override ``Trainer`` arguments."""
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(callbacks=callbacks, **{**defaults, **options})


def fit(module: L.LightningModule, task: TokenTask, callbacks: list, **trainer: Any) -> None:
    """One task: ``Trainer.fit`` for 3 epochs of batches of 32 (seeded, quiet, no checkpoints)."""
    loader = DataLoader(
        task, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    quiet_trainer(callbacks, **{"max_epochs": 3, **trainer}).fit(module, loader)


def main(lam: float | None, n: int = 512, seed: int = 0, **trainer: Any) -> dict[str, float]:
    """Train A then B (``lam=None``: naive, else EWC with that λ); return the accuracies in %.
    ``trainer`` overrides ``lightning.Trainer`` arguments (e.g. ``precision="bf16-mixed"``)."""
    L.seed_everything(seed, verbose=False)
    net = tiny_bert(seed)
    module = Classifier(net, lr=1e-3)
    task_a, task_b = TokenTask("a", n, seed), TokenTask("b", n, seed + 1)
    test_a, test_b = TokenTask("a", 512, seed + 2), TokenTask("b", 512, seed + 3)
    callbacks = [] if lam is None else [EWCCallback(lam=lam, forward=logits_and_labels)]
    fit(module, task_a, callbacks, **trainer)
    after_a = accuracy(net, test_a)
    fit(module, task_b, callbacks, **trainer)
    return {"A after A": after_a, "A after B": accuracy(net, test_a), "B": accuracy(net, test_b)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lam", type=float, default=1e5, help="EWC's λ (default 1e5)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the model and the data")
    cli = parser.parse_args()
    torch.set_num_threads(1)  # a model this small trains fastest on one thread
    for name, lam in (("naive", None), ("EWC", cli.lam)):
        result = main(lam, seed=cli.seed)
        print(f"{name:6s}" + "  ".join(f"{k}: {v:5.1f}" for k, v in result.items()))
