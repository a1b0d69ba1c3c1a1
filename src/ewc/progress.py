"""Progress of a run, one bar per phase: training a task, its Fisher (or other importance),
testing.

Each bar says what is being computed (``ewc seed 0 · task 2/5 · exact Fisher on 10000
samples``) and measures only its own phase, so its rate and ETA are honest: a minute spent on the
Fisher no longer freezes the training bar and then inflates its ETA. Bars are tqdm's text bars on
stderr (the ``cli`` extra), in a terminal and in a notebook alike, with no widget needed.
Disabled, :class:`Progress` needs no tqdm and does nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from ewc._optional import require

T = TypeVar("T")


class _NoBar:
    """Stands in for a tqdm bar when progress is off."""

    def update(self, n: int = 1) -> None:
        """Nothing to show."""

    def close(self) -> None:
        """Nothing to close."""

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Progress:
    """Progress bars of one run, each labelled ``"<label> · <what>"``.

    Args:
        enabled: show bars; False makes every bar a no-op (and tqdm unnecessary).
        label: what the run is, e.g. ``"ewc seed 0"``.
    """

    def __init__(self, enabled: bool, label: str) -> None:
        self._tqdm = require("tqdm", "cli").tqdm if enabled else None
        self.label = label

    def bar(self, what: str, total: int, unit: str) -> Any:
        """A bar of ``total`` ``unit`` s for one phase; use it as a context manager."""
        if self._tqdm is None:
            return _NoBar()
        return self._tqdm(total=total, desc=f"{self.label} · {what}", unit=unit, leave=False)

    def iterate(self, items: Iterable[T], what: str, total: int, unit: str) -> Iterable[T]:
        """``items`` re-iterable as before; each pass shows a bar, opened at its first item, so
        that a consumer which never iterates (SI and L2 need no data to consolidate) shows none."""
        return items if self._tqdm is None else _Counted(self, items, what, total, unit)


@dataclass
class _Counted(Iterable[T]):
    """``items`` with a bar per pass (see :meth:`Progress.iterate`)."""

    progress: Progress
    items: Iterable[T]
    what: str
    total: int
    unit: str

    def __iter__(self) -> Iterator[T]:
        bar = None
        try:
            for item in self.items:
                if bar is None:
                    bar = self.progress.bar(self.what, self.total, self.unit)
                yield item
                bar.update()
        finally:
            if bar is not None:
                bar.close()
