"""Results summarised as text: per-strategy metrics and final accuracies, mean ± std over
seeds, as tables (header and rows of strings) and Markdown.

Needs no matplotlib: the command line prints these tables with the core install alone;
:mod:`ewc.plots` draws and :mod:`ewc.report` renders from the same computations.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ewc.metrics import METRICS, summarize

Results = Mapping[str, Any]
Table = tuple[list[str], list[list[str]]]

METRIC_NAMES = {"acc": "ACC", "bwt": "BWT", "fwt": "FWT", "forgetting": "Forgetting"}


def format_percent(mean: float | None, std: float | None = None, digits: int = 2) -> str:
    """A fraction in %: ``"97.12 ± 0.30"``, ``"97.12"`` without std, ``"n/a"`` without mean."""
    if mean is None:
        return "n/a"
    text = f"{100 * mean:.{digits}f}"
    return text if std is None else f"{text} ± {100 * std:.{digits}f}"


@dataclass(frozen=True)
class MeanStd:
    """Mean and sample standard deviation (ddof=1) of ``n`` values; ``std`` is None for one."""

    mean: float
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> MeanStd:
        """Summarise a non-empty sequence of numbers."""
        v = np.asarray(values, dtype=np.float64)
        return cls(float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else None, int(v.size))

    def percent(self, digits: int = 2) -> str:
        """Formatted as by :func:`format_percent`."""
        return format_percent(self.mean, self.std, digits)


def group_by_strategy(results: Sequence[Results]) -> dict[str, list[Results]]:
    """Runs grouped by ``strategy`` in order of first appearance, each group sorted by seed."""
    groups: dict[str, list[Results]] = {}
    for r in results:
        groups.setdefault(str(r["strategy"]), []).append(r)
    return {k: sorted(v, key=lambda r: r.get("seed", 0)) for k, v in groups.items()}


def final_accuracy_by_strategy(results: Sequence[Results]) -> dict[str, list[MeanStd]]:
    """Per strategy, each task's accuracy after the last task (the last row of ``R``) and, as
    the last entry, their average: mean ± std over the strategy's runs (seeds).

    The metrics themselves (ACC, BWT, ...) are summarised by :func:`ewc.metrics.summarize`.
    """
    summary = {}
    for strategy, runs in group_by_strategy(same_tasks(results)).items():
        last = np.asarray([r["accuracy_matrix"][-1] for r in runs], dtype=np.float64)
        columns = np.column_stack([last, last.mean(axis=1)]).T
        summary[strategy] = [MeanStd.of(column) for column in columns]
    return summary


def same_tasks(runs: Sequence[Results]) -> Sequence[Results]:
    """``runs`` unchanged, after checking that they all share one task sequence."""
    names = {tuple(r["task_names"]) for r in runs}
    if len(names) != 1:
        raise ValueError(f"these results use different task sequences: {sorted(names)}")
    return runs


def metrics_table(runs: Sequence[Results]) -> Table:
    """Header and rows: per strategy, the number of runs and each metric as mean ± std in %."""
    header = ["Strategy", "Runs", *(f"{METRIC_NAMES[m]} (%)" for m in METRICS)]
    rows = [
        [
            row["strategy"],
            str(row["n"]),
            *(format_percent(row[m]["mean"], row[m]["std"]) for m in METRICS),
        ]
        for row in summarize(runs)
    ]
    return header, rows


def final_accuracy_table(runs: Sequence[Results]) -> Table:
    """Header and rows: per strategy, each task's final accuracy and their average, in %."""
    header = ["Strategy", *runs[0]["task_names"], "average"]
    rows = [
        [strategy, *(s.percent() for s in stats)]
        for strategy, stats in final_accuracy_by_strategy(runs).items()
    ]
    return header, rows


def md(text: str) -> str:
    """``text`` for Markdown, which passes HTML through: ``<``, ``>`` and ``&`` escaped."""
    return html.escape(str(text), quote=False)


def markdown_table(table: Table) -> str:
    """A table as GitHub-flavoured Markdown; cells escaped (:func:`_md`, and ``|``)."""
    header, rows = table

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(md(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)])
