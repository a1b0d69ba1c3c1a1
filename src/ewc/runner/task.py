"""One task's training and evaluation: the batches, the optimizer step with its penalty, the
accuracy on a test set, and the divergence check.

The loop is the plain PyTorch one: in-memory uint8 tensors, a batch is an index gather, the
regularizer's closed-form gradient is added to ``.grad`` after ``backward`` (or, with
``penalty="autograd"``, ``reg.penalty()`` is added to the loss).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ewc import distributed, fsdp
from ewc.data.datasets import to_float
from ewc.regularizers import QuadraticRegularizer, Regularizer
from ewc.runner.config import RunConfig
from ewc.runner.masks import mask_logits


class Batches:
    """Re-iterable ``(x_float, y, active_mask)`` batches, one per tensor of sample indices in
    ``parts``; the mask is expanded to one row per sample ``[B, n_outputs]``, so that it splits
    along with the batch."""

    def __init__(
        self, x: Tensor, y: Tensor, active: Tensor | None, parts: Sequence[Tensor]
    ) -> None:
        self.x, self.y, self.active, self.parts = x, y, active, parts

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        for idx in self.parts:
            active = None if self.active is None else self.active.expand(len(idx), -1)
            yield to_float(self.x[idx]), self.y[idx], active


def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, active: Tensor | None = None, batch_size: int = 256
) -> float:
    """Accuracy (fraction) of ``model`` on inputs ``x`` [N, ...] with labels ``y`` [N], without
    a graph (``no_grad``, not ``inference_mode``: FSDP2 writes into its all-gather buffers
    outside it, which inference tensors forbid), in batches of ``batch_size``. On a CPU, the
    seed CNN's activations for 1000 samples (100 MB a layer) are over glibc's 32 MB mmap
    threshold, so each batch page-faults them in anew: 250k page faults and 1.8x the time of
    batches of 256 for 2000 samples."""
    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            logits = mask_logits(model(to_float(x[start : start + batch_size])), active)
            correct += int((logits.argmax(1) == y[start : start + batch_size]).sum())
    model.train(was_training)
    return correct / max(len(y), 1)


class DivergedError(ValueError):
    """Training diverged: the loss exploded, or the weights blew up or became NaN or infinite."""


#: A mean cross-entropy (between two curve points) above this many times log(n_classes), the
#: loss of a uniform guess, means the run diverged. Healthy runs stay far below: class-incremental
#: runs with a stiff penalty peak near 8x at the start of a task; lr = 1e6 gives about 1e5 x.
LOSS_LIMIT = 100.0
#: Weights grown beyond this many times their initial magnitude (at least 1) blew up.
WEIGHT_LIMIT = 1e4
_ADVICE = (
    "the step (lr) or the penalty (lam) is too large; lower it, or use penalty='proximal' with SGD"
)


class Divergence:
    """Stops a run that diverged, from its loss and its weights, not only from NaN. Checked
    where the runner synchronises anyway (at curve points and at the end of a task), so it adds
    nothing to a training step.

    Args:
        model: the model being trained; its weights' initial magnitudes are the reference.
        n_classes: the width of its output (the loss limit is ``LOSS_LIMIT · log(n_classes)``).
    """

    def __init__(self, model: nn.Module, n_classes: int) -> None:
        self.model = model
        self.loss_limit = LOSS_LIMIT * math.log(max(n_classes, 2))
        self.names = [n for n, p in model.named_parameters() if p.numel()]
        with torch.no_grad():
            self.weight_limit = WEIGHT_LIMIT * self._sizes().clamp(min=1.0)

    def _sizes(self) -> Tensor:
        """The largest magnitude in each parameter, one float32 per parameter (of the whole
        parameter under FSDP: each rank's shard, then the maximum over ranks)."""
        named = dict(self.model.named_parameters())
        shards = [fsdp.local(named[n]).detach() for n in self.names]
        sizes = torch.stack(
            [t.abs().amax().float() if t.numel() else t.new_zeros((), dtype=torch.float32)
             for t in shards]
        )  # fmt: skip
        if any(fsdp.is_sharded(named[n]) for n in self.names):
            torch.distributed.all_reduce(sizes, op=torch.distributed.ReduceOp.MAX)
        return sizes.cpu()

    def check_loss(self, loss: float | None, task: str, step: int) -> None:
        """Raise :class:`DivergedError` if ``loss`` (a mean cross-entropy in nats, None if no
        step was taken) is NaN, infinite or above the limit."""
        if loss is None or loss <= self.loss_limit:
            return
        raise DivergedError(
            f"the training loss exploded while training task {task!r}: a mean cross-entropy of "
            f"{loss:.3g} nats before step {step}, over {LOSS_LIMIT:g} x that of a uniform guess "
            f"({self.loss_limit / LOSS_LIMIT:.3g}): {_ADVICE}"
        )

    @torch.no_grad()
    def check_weights(self, task: str) -> None:
        """Raise :class:`DivergedError` naming the parameters that are NaN, infinite or grown
        beyond ``WEIGHT_LIMIT`` times their initial magnitude."""
        if not self.names:
            return
        sizes = self._sizes()
        bad = [
            n
            for n, ok in zip(self.names, (sizes <= self.weight_limit).tolist(), strict=True)
            if not ok
        ]
        if not bad:
            return
        where = f"{', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}"
        if bool(torch.isfinite(sizes).all()):
            what = f"the weights blew up (over {WEIGHT_LIMIT:g} x their initial size, in {where})"
        else:
            what = f"the weights became NaN or infinite (in {where})"
        raise DivergedError(f"{what} while training task {task!r}: {_ADVICE}")


def mean_loss(logits: Tensor, y: Tensor, n_batch: int) -> Tensor:
    """Cross-entropy averaged over the global batch of ``n_batch`` samples. Under DDP each rank
    holds a shard and DDP averages the ranks' gradients, so each rank's loss is its sum times
    ``world_size / n_batch``: exact for shards of any size, an empty one included."""
    if not distributed.active():
        return F.cross_entropy(logits, y)
    return F.cross_entropy(logits, y, reduction="sum") * (distributed.world_size() / n_batch)


def n_steps(cfg: RunConfig, n_samples: int) -> int:
    if cfg.iterations is not None:
        return int(cfg.iterations)
    assert cfg.epochs is not None and cfg.batch_size is not None
    return max(1, math.ceil(cfg.epochs * n_samples / cfg.batch_size))


def batch_indices(
    n: int, batch_size: int, n_steps: int, generator: torch.Generator, device: torch.device
) -> Iterator[Tensor]:
    """``n_steps`` batches of sample indices; reshuffled every epoch, the last batch of an epoch
    may be smaller."""
    done = 0
    while done < n_steps:
        for idx in torch.randperm(n, generator=generator).to(device).split(batch_size):
            if done == n_steps:
                return
            yield idx
            done += 1


def stage_data(train_sets: list[Any], stage: int, joint: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Training inputs, labels and per-sample task ids for one stage (tasks 0..stage if joint)."""
    chosen = range(stage + 1) if joint else [stage]
    x = torch.cat([train_sets[j].x for j in chosen])
    y = torch.cat([train_sets[j].y for j in chosen])
    ids = torch.cat(
        [torch.full((len(train_sets[j].y),), j, dtype=torch.long, device=y.device) for j in chosen]
    )
    return x, y, ids


def make_optimizer(name: str | None, lr: float, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # PyTorch's fused kernels update each parameter in one pass instead of about ten: a loop on
    # the Permuted MNIST MLP runs 1.13-1.27x slower with the default Adam on CPU
    # (docs/benchmarks.md). Same update rule.
    optimizer = torch.optim.SGD if name == "sgd" else torch.optim.Adam
    try:
        return optimizer(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):  # a torch, device or dtype without the fused kernels
        return optimizer(params, lr=lr)


class TrainStep:
    """One optimizer step on a batch: forward (masked), the mean cross-entropy, the penalty by
    the configured path (``"autograd"``: added to the loss; ``"grad"``: its closed-form
    gradient added after ``backward``; ``"proximal"``: an implicit step after the optimizer's),
    then the regularizer's :meth:`~ewc.regularizers.Regularizer.after_step`."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        reg: Regularizer | None,
        penalty: str | None,
        lr: float,
    ) -> None:
        self.model, self.optimizer, self.reg, self.penalty, self.lr = (
            model, optimizer, reg, penalty, lr
        )  # fmt: skip

    def __call__(self, x: Tensor, y: Tensor, active: Tensor | None, n_batch: int) -> Tensor:
        """Train on inputs ``x`` [B, ...] (uint8 or float), labels ``y`` [B], output mask
        ``active``, this rank's share of a global batch of ``n_batch`` samples; return the task
        loss (a 0-dim tensor, before any penalty)."""
        reg = self.reg
        logits = mask_logits(self.model(to_float(x)), active)
        task_loss = loss = mean_loss(logits, y, n_batch)
        if reg is not None and self.penalty == "autograd":
            loss = loss + reg.penalty()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if reg is not None and self.penalty == "grad":
            reg.add_penalty_grad()
        self.optimizer.step()
        if reg is not None:
            if self.penalty == "proximal":
                assert isinstance(reg, QuadraticRegularizer)  # checked by resolve_config
                reg.proximal_step(self.lr)
            reg.after_step()
        return task_loss
