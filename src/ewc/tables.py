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


# --------------------------------------------------------------------------- in words

#: Strategies a comparison measures the others against: no protection, and the upper bound
#: that trains on every task at once.
BASELINES = ("naive", "joint")
#: Settings that belong to a strategy (its strength and options), shown per strategy.
STRATEGY_FIELDS = ("lam", "gamma", "xi", "fisher", "fisher_samples", "penalty")
#: Settings that vary per run or say nothing about the training itself.
_NOT_SHARED = ("strategy", "seed", "extra", "note", *STRATEGY_FIELDS)


def _settings(run: Results) -> Mapping[str, Any]:
    """The settings that apply to ``run`` (``settings``), else its whole config (older files)."""
    return run.get("settings") or run.get("config", {})


def setting_text(value: Any) -> str:
    """A setting's value as the command line takes it: ``[100, 100]`` -> ``100,100``,
    ``20.0`` -> ``20``, ``1e4`` -> ``10000``."""
    if isinstance(value, list | tuple):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def takeaway(runs: Sequence[Results]) -> str:
    """The result in one sentence, in the tasks' names: the best strategy (by average accuracy
    after the last task, baselines aside) against naive fine-tuning — the earlier tasks kept
    and the last one learned, with its λ — or, without naive, against the other strategies."""
    stats = final_accuracy_by_strategy(runs)
    names = runs[0]["task_names"]
    groups = group_by_strategy(runs)

    def kept(s: str) -> float:  # the earlier tasks' accuracy after the last, in %
        return 100 * float(np.mean([m.mean for m in stats[s][:-2]]))

    def learned(s: str) -> float:  # the last task's accuracy after learning it, in %
        return 100 * stats[s][-2].mean

    candidates = [s for s in stats if s not in BASELINES] or list(stats)
    best = max(candidates, key=lambda s: stats[s][-1].mean)
    lam = _settings(groups[best][0]).get("lam")
    who = best + (f" (λ = {setting_text(lam)})" if lam is not None else "")
    seeds = len(groups[best])
    over = f", mean of {seeds} seeds" if seeds > 1 else ""
    if len(names) == 1:
        return f"{who} reached {learned(best):.1f} % on {names[0]}{over}."
    earlier = names[0] if len(names) == 2 else f"the first {len(names) - 1} tasks"
    mean = "" if len(names) == 2 else " on average"
    last = names[-1]
    if "naive" not in stats or best == "naive":
        others = ", ".join(f"{s} {100 * stats[s][-1].mean:.1f} %" for s in stats if s != best)
        versus = f" (average over the tasks; {others})" if others else ""
        return (
            f"{who} kept {earlier} at {kept(best):.1f} %{mean} after learning {last} "
            f"({learned(best):.1f} %){over}{versus}."
        )
    gain = learned(best) - learned("naive")
    both = f"({learned(best):.1f} % against {learned('naive'):.1f} %)"
    if gain <= -0.05:
        cost = (
            f"at a cost of {-gain:.1f} point{'' if round(-gain, 1) == 1 else 's'} on {last} {both}"
        )
    elif gain >= 0.05:
        cost = f"and learned {last} better too {both}"
    else:
        cost = f"and learned {last} as well ({learned(best):.1f} %)"
    return (
        f"{who} kept {earlier} at {kept(best):.1f} %{mean} against {kept('naive'):.1f} % "
        f"without it (naive fine-tuning), {cost}{over}."
    )


def strategy_settings_table(runs: Sequence[Results]) -> Table:
    """Header and rows: per strategy, its strength λ and its other settings (γ, ξ, the Fisher,
    the penalty path); ``–`` where a setting does not apply."""
    groups = group_by_strategy(runs)
    fields = [f for f in STRATEGY_FIELDS if any(f in _settings(r) for r in runs)]
    header = ["Strategy", *("λ" if f == "lam" else f for f in fields)]
    rows = [
        [s, *(setting_text(_settings(g[0])[f]) if f in _settings(g[0]) else "–" for f in fields)]
        for s, g in groups.items()
    ]
    return header, rows


def shared_settings(runs: Sequence[Results]) -> str:
    """The settings every run shares (model, length, batch, optimizer, ...), as one line."""
    first = _settings(runs[0])
    shared = {
        k: v
        for k, v in first.items()
        if k not in _NOT_SHARED and all(_settings(r).get(k) == v for r in runs)
    }
    return ", ".join(f"{k} {setting_text(v)}" for k, v in shared.items())


def sample_cap(runs: Sequence[Results]) -> int | None:
    """The training samples a task all runs were capped at (``max_train_samples``: the demo's
    ``--fast``), else None."""
    caps = {r.get("config", {}).get("max_train_samples") for r in runs}
    return caps.pop() if len(caps) == 1 and None not in caps else None
