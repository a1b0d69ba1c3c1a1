"""Scalars logged while a run trains: a CSV file and TensorBoard event files.

:class:`ScalarLogger` writes every scalar it is given twice, into one folder:

- ``scalars.csv``: columns ``step, tag, value, wall_time`` (one row per scalar; step in
  optimizer steps over the whole sequence, wall time in seconds since the epoch), flushed at
  every point, so it can be read while the run trains;
- TensorBoard event files (``torch.utils.tensorboard``, the ``tensorboard`` extra; without it,
  the CSV file alone): view them with ``tensorboard --logdir DIR``.

The runner (:func:`ewc.runner.run` with ``log_dir``) logs at every curve point:
``loss/cross_entropy`` (mean over the optimizer steps since the previous point),
``loss/penalty`` (the regularizer's penalty (λ/2)·Σ Ω (θ − θ*)² at the point, strategies with
one) and ``accuracy/<task name>`` (test accuracy in %, on the curve's samples of each task;
``/`` in a task name becomes ``-``: ``accuracy/0-1``).
Under ``torchrun`` only rank 0 writes.
"""

from __future__ import annotations

import csv
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from ewc import distributed
from ewc._optional import MissingExtraError, MissingExtraWarning, require
from ewc.results import check_output

CSV_NAME = "scalars.csv"
CSV_FIELDS = ("step", "tag", "value", "wall_time")


class ScalarLogger:
    """CSV and TensorBoard logs of scalars in ``log_dir`` (created if needed).

    Without the ``tensorboard`` package it writes ``scalars.csv`` alone, after a
    :class:`ewc._optional.MissingExtraWarning` naming ``pip install 'ewc[tensorboard]'``.
    """

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        self.log_dir = Path(log_dir)
        self._main = distributed.is_main_process()
        if not self._main:
            return
        check_output(self.log_dir, folder=True)  # one clear OutputError
        self._events = _summary_writer(self.log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._file = open(self.log_dir / CSV_NAME, "w", newline="", encoding="utf-8")  # noqa: SIM115
        self._csv = csv.writer(self._file)
        self._csv.writerow(CSV_FIELDS)

    def log(self, step: int, scalars: Mapping[str, float | None]) -> None:
        """Write each ``tag: value`` at optimizer step ``step``; None values are skipped."""
        if not self._main:
            return
        now = time.time()
        for tag, value in scalars.items():
            if value is not None:
                if self._events is not None:
                    self._events.add_scalar(tag, value, step, walltime=now)
                self._csv.writerow([step, tag, f"{value:.9g}", f"{now:.3f}"])
        self._file.flush()
        if self._events is not None:
            self._events.flush()

    def close(self) -> None:
        """Flush and close both files."""
        if self._main:
            if self._events is not None:
                self._events.close()
            self._file.close()

    def __enter__(self) -> ScalarLogger:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _summary_writer(log_dir: Path) -> Any:
    """TensorBoard's ``SummaryWriter`` for ``log_dir``, or None (with a warning that names the
    extra) when the ``tensorboard`` package is missing."""
    try:
        require("tensorboard", "tensorboard")  # torch.utils.tensorboard imports it
    except MissingExtraError as e:
        warnings.warn(f"{log_dir}: writing {CSV_NAME} only. {e}", MissingExtraWarning, stacklevel=3)
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(log_dir))
