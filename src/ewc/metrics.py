"""Continual-learning metrics from an accuracy matrix.

``R[i][j]`` is the test accuracy (a fraction in [0, 1]) on task ``j`` after training on task
``i``, for ``T`` tasks. With ``b[j]`` the accuracy of the randomly initialised model on task ``j``:

- average accuracy  ``ACC = 1/T  Σ_j R[T-1][j]``;
- backward transfer ``BWT = 1/(T-1) Σ_{j<T-1} (R[T-1][j] - R[j][j])`` (negative = forgetting);
- forward transfer  ``FWT = 1/(T-1) Σ_{j>0} (R[j-1][j] - b[j])``
  (Lopez-Paz & Ranzato, "Gradient Episodic Memory", NeurIPS 2017);
- forgetting ``F = 1/(T-1) Σ_{j<T-1} max_{l<T-1} (R[l][j] - R[T-1][j])``
  (Chaudhry et al., "Riemannian Walk", ECCV 2018).

BWT, FWT and forgetting are undefined for a single task and reported as ``None``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

METRICS = ("acc", "bwt", "fwt", "forgetting")


def _matrix(accuracy_matrix: Sequence[Sequence[float]]) -> np.ndarray:
    rows = list(accuracy_matrix) if isinstance(accuracy_matrix, Sequence) else None
    if rows is not None and not all(isinstance(row, Sequence | np.ndarray) for row in rows):
        raise ValueError("accuracy_matrix must be a list of rows, one per task (a T x T matrix)")
    lengths = [len(row) for row in rows] if rows is not None else []
    if len(set(lengths)) > 1:
        raise ValueError(
            f"accuracy_matrix must be a square T x T matrix; its rows have {lengths} entries"
        )
    try:
        r = np.asarray(accuracy_matrix, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"accuracy_matrix must hold numbers (fractions in [0, 1]): {e}") from None
    if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] == 0:
        raise ValueError(
            f"accuracy_matrix must be a non-empty square T x T matrix, got shape {r.shape}"
        )
    if not np.all((r >= 0) & (r <= 1)):
        raise ValueError("accuracy_matrix holds fractions in [0, 1]; divide percentages by 100")
    return r


def average_accuracy(accuracy_matrix: Sequence[Sequence[float]]) -> float:
    """Mean accuracy over all tasks after training on the last one."""
    return float(_matrix(accuracy_matrix)[-1].mean())


def backward_transfer(accuracy_matrix: Sequence[Sequence[float]]) -> float | None:
    """Mean change of each earlier task's accuracy from just after learning it to the end."""
    r = _matrix(accuracy_matrix)
    t = r.shape[0]
    return None if t < 2 else float(np.mean(r[-1, :-1] - np.diag(r)[:-1]))


def forward_transfer(
    accuracy_matrix: Sequence[Sequence[float]], random_init_accuracy: Sequence[float]
) -> float | None:
    """Mean accuracy on each task just before learning it, above a random initial model's."""
    r = _matrix(accuracy_matrix)
    b = np.asarray(random_init_accuracy, dtype=np.float64)
    t = r.shape[0]
    if b.shape != (t,):
        raise ValueError(f"random_init_accuracy needs {t} entries, got {b.shape[0]}")
    return None if t < 2 else float(np.mean([r[j - 1, j] - b[j] for j in range(1, t)]))


def forgetting(accuracy_matrix: Sequence[Sequence[float]]) -> float | None:
    """Mean drop from each earlier task's best accuracy to its final accuracy."""
    r = _matrix(accuracy_matrix)
    t = r.shape[0]
    return None if t < 2 else float(np.mean(r[:-1, :-1].max(axis=0) - r[-1, :-1]))


def compute_metrics(
    accuracy_matrix: Sequence[Sequence[float]], random_init_accuracy: Sequence[float]
) -> dict[str, float | None]:
    """All metrics at once: ``{"acc", "bwt", "fwt", "forgetting"}``, fractions (not %)."""
    return {
        "acc": average_accuracy(accuracy_matrix),
        "bwt": backward_transfer(accuracy_matrix),
        "fwt": forward_transfer(accuracy_matrix, random_init_accuracy),
        "forgetting": forgetting(accuracy_matrix),
    }


def summarize(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Group runs by strategy (in first-seen order); mean and sample std of each metric over seeds.

    Returns one row per strategy: ``{"strategy", "n", "acc": {"mean", "std"}, "bwt": ..., ...}``;
    ``std`` is ``None`` for a single run, and a metric undefined in any run (``None``) stays
    ``None``.
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in results:
        groups.setdefault(r["strategy"], []).append(r)
    rows = []
    for strategy, runs in groups.items():
        row: dict[str, Any] = {"strategy": strategy, "n": len(runs)}
        for name in METRICS:
            values = [r["metrics"][name] for r in runs]
            if any(v is None for v in values):
                row[name] = {"mean": None, "std": None}
                continue
            arr = np.asarray(values, dtype=np.float64)
            std = float(arr.std(ddof=1)) if len(arr) > 1 else None
            row[name] = {"mean": float(arr.mean()), "std": std}
        rows.append(row)
    return rows
