"""What both forgetting meters share: the loss and accuracy of a model on reference data (e.g.
the first task's text, or a general-text sample for a base model), and their change since the
first measurement."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ewc.fisher._util import eval_mode
from ewc.fisher.batching import Forward, to_device

from ._continual import _is_map_dataset

IGNORE_INDEX = -100


class ReferenceMeter:
    """Measures a categorical model on fixed reference batches.

    Args:
        data: the reference data: batches (a ``DataLoader``, a list of batches) or a map-style
            dataset (batched by ``batch_size``). Read again at every measurement.
        forward: ``forward(model, batch) -> (logits [N, ..., C], labels [N, ...])``; labels
            of ``-100`` (padding, prompt tokens) are not counted.
        name: the prefix of the metric names.
        every: measure every this many optimizer steps.
        batch_size: the batch size for a map-style ``data``.

    :meth:`measure` returns ``{name}/loss`` (mean cross-entropy per labelled position, nats),
    ``{name}/loss_change`` (relative to the first measurement: ``loss / loss_0 - 1``, so 0.1
    is 10 % worse), ``{name}/accuracy`` and ``{name}/accuracy_change`` (fractions; the change
    is ``accuracy - accuracy_0``) and, when a penalty is given, ``ewc/penalty``. Every
    measurement is also appended to :attr:`history` with its ``step``.
    """

    def __init__(
        self, data: Any, forward: Forward, name: str, every: int, batch_size: int = 16
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1 (optimizer steps); got {every!r}.")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty string; got {name!r}.")
        if _is_map_dataset(data):
            data = DataLoader(data, batch_size=batch_size)
        elif not isinstance(data, Iterable):
            raise ValueError(
                f"reference data of type {type(data).__name__} is neither batches nor a "
                "map-style dataset; pass a DataLoader, a list of batches or a Dataset."
            )
        self.data, self.forward, self.name, self.every = data, forward, name, every
        self.baseline: tuple[float, float] | None = None
        self.history: list[dict[str, float]] = []
        self.last_step: int | None = None

    def due(self, step: int) -> bool:
        """Whether step ``step`` is one to measure at (a multiple of ``every``, not done yet)."""
        return step % self.every == 0 and step != self.last_step

    def measure(self, model: nn.Module, step: int, penalty: float | None) -> dict[str, float]:
        """The metrics (class docstring) of ``model`` now, in eval mode (restored after)."""
        loss, accuracy = reference_loss(model, self.data, self.forward)
        if self.baseline is None:
            self.baseline = (loss, accuracy)
        loss_0, accuracy_0 = self.baseline
        metrics = {
            f"{self.name}/loss": loss,
            f"{self.name}/loss_change": loss / loss_0 - 1 if loss_0 > 0 else math.nan,
            f"{self.name}/accuracy": accuracy,
            f"{self.name}/accuracy_change": accuracy - accuracy_0,
        }
        if penalty is not None:
            metrics["ewc/penalty"] = penalty
        self.history.append({"step": step, **metrics})
        self.last_step = step
        return metrics


@torch.no_grad()
def reference_loss(
    model: nn.Module, batches: Iterable[Any], forward: Forward
) -> tuple[float, float]:
    """``(loss, accuracy)`` of ``model`` on ``batches`` in eval mode (restored after): the mean
    cross-entropy (nats) and the fraction of argmax hits over every labelled position
    (``forward(model, batch) -> (logits [N, ..., C], labels [N, ...])``; ``-100`` labels are
    skipped). Raises ``ValueError`` when no position is labelled."""
    device = next(model.parameters()).device
    total, correct, count = 0.0, 0, 0
    with eval_mode(model):
        for batch in batches:
            logits, labels = forward(model, to_device(batch, device))
            logits, labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
            keep = labels != IGNORE_INDEX
            logits, labels = logits[keep].float(), labels[keep]
            total += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
            count += int(labels.numel())
    if count == 0:
        raise ValueError(
            "the reference data has no labelled position (all labels -100, or no batches); "
            "pass text with at least two tokens per sample, or labelled samples."
        )
    return total / count, correct / count


def penalty_of(callbacks: Iterable[Any]) -> float | None:
    """The current penalty of the first callback among ``callbacks`` that holds a built
    regularizer (an ``EWCCallback``), else ``None``."""
    for callback in callbacks:
        regularizer = getattr(callback, "regularizer", None)
        if regularizer is not None and hasattr(regularizer, "penalty"):
            with torch.no_grad():
                value: Tensor = regularizer.penalty()
            return float(value)
    return None
