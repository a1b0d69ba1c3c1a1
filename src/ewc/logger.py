"""Scalars logged while a run trains: a CSV file and TensorBoard event files.

:class:`ScalarLogger` writes every scalar it is given twice, into one folder:

- ``scalars.csv``: columns ``step, tag, value, wall_time`` (one row per scalar; step in
  optimizer steps over the whole sequence, wall time in seconds since the epoch), flushed at
  every point, so it can be read while the run trains;
- TensorBoard event files (``torch.utils.tensorboard``, the ``tensorboard`` extra): view them
  with ``tensorboard --logdir DIR``.

The runner (:func:`ewc.runner.run` with ``log_dir``) logs at every curve point:
``loss/cross_entropy`` (mean over the optimizer steps since the previous point),
``loss/penalty`` (the regularizer's penalty (λ/2)·Σ Ω (θ − θ*)² at the point, strategies with
one) and ``accuracy/<task name>`` (test accuracy in %, on the curve's samples of each task).
Under ``torchrun`` only rank 0 writes.
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

from ewc import distributed
from ewc._optional import require
from ewc.results import check_output

CSV_NAME = "scalars.csv"
CSV_FIELDS = ("step", "tag", "value", "wall_time")


class ScalarLogger:
    """CSV and TensorBoard logs of scalars in ``log_dir`` (created if needed).

    Raises :class:`ewc._optional.MissingExtraError` (naming ``pip install 'ewc[tensorboard]'``)
    when the ``tensorboard`` package is missing, before anything is written.
    """

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        require("tensorboard", "tensorboard")  # torch.utils.tensorboard imports it
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        self._main = distributed.is_main_process()
        if not self._main:
            return
        check_output(self.log_dir, folder=True)  # creates it, or one clear OutputError
        self._events = SummaryWriter(str(self.log_dir))
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
                self._events.add_scalar(tag, value, step, walltime=now)
                self._csv.writerow([step, tag, f"{value:.9g}", f"{now:.3f}"])
        self._file.flush()
        self._events.flush()

    def close(self) -> None:
        """Flush and close both files."""
        if self._main:
            self._events.close()
            self._file.close()

    def __enter__(self) -> ScalarLogger:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
