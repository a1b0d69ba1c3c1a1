"""The curves of a run: accuracy on every task and the training loss, as training goes.

:class:`Curves` collects, at each curve point (an optimizer step count over the whole sequence),
the test accuracy on every task, the mean training cross-entropy of the steps since the previous
point, and the regularizer's penalty; it becomes the results' ``curves`` and, given a
:class:`ewc.logger.ScalarLogger`, is logged as it grows (CSV and TensorBoard, while the run
trains).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ewc.logger import ScalarLogger
from ewc.regularizers import Regularizer


class Curves:
    """Curve points of one run.

    Args:
        task_names: the tasks, in order (the names of the ``accuracy/<task>`` scalars).
        penalty: whether the strategy has a penalty (a regularizer) to record.
        logger: where to log each point while training runs, if anywhere.
    """

    def __init__(
        self, task_names: list[str], penalty: bool, logger: ScalarLogger | None = None
    ) -> None:
        self.task_names, self.logger = task_names, logger
        self.step: list[int] = []
        self.task_boundaries: list[int] = []
        self.accuracy: list[list[float]] = []
        self.loss: list[float | None] = []
        self.penalty: list[float | None] = []
        self.records_penalty = penalty
        self._loss_sum: Tensor | None = None
        self._loss_steps = 0

    def add_loss(self, loss: Tensor) -> None:
        """Count one optimizer step's cross-entropy (a 0-dim tensor; kept on its device, so
        no synchronisation per step)."""
        loss = loss.detach()
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss
        self._loss_steps += 1

    def point(self, step: int, accuracy: list[float], penalty: Tensor | None) -> None:
        """Record a point at optimizer step ``step``: accuracies (fractions, one per task), the
        mean cross-entropy since the previous point (None if no step was taken since) and the
        penalty's value now (None without a regularizer)."""
        loss = None
        if self._loss_sum is not None:
            loss = float(self._loss_sum) / self._loss_steps
        self._loss_sum, self._loss_steps = None, 0
        self.step.append(step)
        self.accuracy.append(accuracy)
        self.loss.append(loss)
        self.penalty.append(None if penalty is None else float(penalty))
        self._log(len(self.step) - 1)

    def restore(self, saved: dict[str, Any]) -> None:
        """Take the points of :meth:`to_dict` output (a run resumed from a checkpoint) and log
        them again, so that the log files hold the whole run."""
        for key in ("step", "task_boundaries", "accuracy", "loss", "penalty"):
            getattr(self, key)[:] = saved.get(key, [None] * len(saved["step"]))
        for index in range(len(self.step)):
            self._log(index)

    def _log(self, index: int) -> None:
        """Log point ``index``, unless it is at the step of the point before (the first point of
        a task, right after the previous task's test point): one row per step and tag."""
        if self.logger is None or (index > 0 and self.step[index] == self.step[index - 1]):
            return
        scalars = {"loss/cross_entropy": self.loss[index], "loss/penalty": self.penalty[index]}
        for name, acc in zip(self.task_names, self.accuracy[index], strict=True):
            scalars[f"accuracy/{tag_name(name)}"] = 100 * acc
        self.logger.log(self.step[index], scalars)

    def to_dict(self) -> dict[str, Any]:
        """The results' ``curves``: ``step``, ``task_boundaries``, ``accuracy`` [point][task]
        (fractions), ``loss`` (cross-entropy, nats) and, for regularizers, ``penalty``."""
        curves: dict[str, Any] = {
            "step": self.step,
            "task_boundaries": self.task_boundaries,
            "accuracy": self.accuracy,
            "loss": self.loss,
        }
        if self.records_penalty:
            curves["penalty"] = self.penalty
        return curves


def tag_name(task_name: str) -> str:
    """A task name as one level of a log tag: ``/`` separates levels in TensorBoard, so split
    tasks' ``"0/1"`` becomes ``"0-1"`` (``accuracy/0-1``, not ``accuracy/0/1``)."""
    return task_name.replace("/", "-")


@torch.no_grad()
def penalty_value(reg: Regularizer | None) -> Tensor | None:
    """The regularizer's current penalty (λ/2)·Σ Ω (θ − θ*)², or None without one."""
    return None if reg is None else reg.penalty().detach()
