"""Figures from results dicts (schema ``ewc.results/1``) and sweeps (``ewc.sweep/1``).

Every plot is a pure function of the JSON data (as loaded by :func:`ewc.results.load_results`):
no training and no torch. Figures are built on :class:`matplotlib.figure.Figure` directly, not
through ``pyplot``, so they hold no global state, need no display and are freed like any other
object; :func:`save_figure` renders them with the Agg (PNG) and SVG backends.

Colours come from the Okabe–Ito palette, which stays distinguishable under the common forms of
colour blindness. Accuracies are fractions in the files and percentages on the axes.

The per-task final accuracies, mean ± std over seeds, come from :mod:`ewc.tables`
(:func:`~ewc.tables.final_accuracy_by_strategy`), so the bars and the report's table agree on
one computation.
"""

from __future__ import annotations

import io
import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from ewc._optional import require

require("matplotlib", "plots")  # before matplotlib's own imports: a missing extra is named
import matplotlib  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ewc.results import atomic_write_bytes  # noqa: E402
from ewc.tables import MeanStd, final_accuracy_by_strategy, group_by_strategy, same_tasks  # noqa: E402
from ewc.tables import format_percent as format_percent  # noqa: E402  (re-exported)

Results = Mapping[str, Any]

#: Okabe & Ito (2008), "Color Universal Design"; yellow last, it is faint on white.
PALETTE = (
    "#0072B2",  # blue
    "#E69F00",  # orange
    "#009E73",  # bluish green
    "#D55E00",  # vermillion
    "#CC79A7",  # reddish purple
    "#56B4E9",  # sky blue
    "#000000",  # black
    "#F0E442",  # yellow
)
STEPS_LABEL = "optimizer steps"
#: Panels of accuracy curves in a row; more strategies take more rows, each panel readable.
CURVE_COLUMNS = 3
ACCURACY_LABEL = "test accuracy (%)"
LOSS_LABEL = "training loss (log scale)"


#: One colour per strategy, the same in every figure (reports, README, notebook).
STRATEGY_COLORS = {
    "naive": PALETTE[6],
    "joint": PALETTE[2],
    "ewc": PALETTE[0],
    "online-ewc": PALETTE[5],
    "si": PALETTE[1],
    "mas": PALETTE[4],
    "l2": PALETTE[3],
    "kfac": "#882255",  # wine (Tol's palette): the Okabe-Ito colours above are taken
}
#: Published or reference points drawn beside our runs (e.g. the seed notebook's result).
REFERENCE_COLOR = "#7F7F7F"


def color(i: int) -> str:
    """The ``i``-th palette colour, cycling."""
    return PALETTE[i % len(PALETTE)]


def strategy_color(strategy: str) -> str:
    """The fixed colour of a strategy; another name gets a colour from a hash of it, the same in
    every figure and process."""
    return STRATEGY_COLORS.get(strategy) or color(zlib.crc32(strategy.encode()))


def _as_list(results: Results | Sequence[Results]) -> list[Results]:
    return [results] if isinstance(results, Mapping) else list(results)


def _pct(values: Any) -> np.ndarray:
    return 100 * np.asarray(values, dtype=np.float64)


# --------------------------------------------------------------------------- figures


def plot_accuracy_curves(results: Results | Sequence[Results]) -> Figure:
    """Each task's test accuracy over the whole sequence: the classic forgetting figure.

    One panel per strategy (sharing the y axis), drawn from that strategy's lowest seed, at most
    :data:`CURVE_COLUMNS` to a row; task spans are shaded and named, task boundaries drawn as
    dashed lines.
    """
    runs = [group[0] for group in group_by_strategy(_as_list(results)).values()]
    missing = [r["strategy"] for r in runs if not r.get("curves")]
    if missing:
        raise ValueError(f"no accuracy curves recorded for {missing}")
    columns = min(len(runs), CURVE_COLUMNS)
    rows = -(-len(runs) // columns)
    fig = Figure(figsize=(4.8 * columns + 1.8, 3.8 * rows), layout="constrained")
    grid = fig.subplots(rows, columns, sharey=True, squeeze=False)
    for ax, run in zip(grid.flat, runs, strict=False):
        _draw_curves(ax, run)
    for ax in grid.flat[len(runs) :]:
        ax.set_visible(False)  # the last row's empty places
    for row in grid:
        row[0].set_ylabel(ACCURACY_LABEL)
    grid[0, -1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), title="evaluated on")
    fig.suptitle(f"Accuracy on every task during training — {runs[0]['benchmark']}")
    return fig


def _draw_curves(ax: Axes, run: Results) -> None:
    curves, names = run["curves"], run["task_names"]
    steps = np.asarray(curves["step"])
    spans = [*curves["task_boundaries"], steps[-1]]
    for t, (start, end) in enumerate(pairwise(spans)):
        ax.axvspan(start, end, color=color(t), alpha=0.08, lw=0)
        ax.text(
            (start + end) / 2,
            1.01,
            f"train {names[t]}",
            ha="center",
            va="bottom",
            fontsize="small",
            transform=ax.get_xaxis_transform(),
        )
        if t:
            ax.axvline(start, color="0.35", ls="--", lw=0.8)
    accuracy = _pct(curves["accuracy"])
    for t, name in enumerate(names):
        ax.plot(steps, accuracy[:, t], color=color(t), lw=1.6, label=name)
    ax.set(xlim=(steps[0], steps[-1]), ylim=(0, 101), xlabel=STEPS_LABEL)
    title = f"{run['strategy']} (seed {run.get('seed', 0)})"
    ax.set_title(title, pad=16, color=strategy_color(run["strategy"]))
    ax.grid(axis="y", alpha=0.3)


def plot_training_loss(results: Results | Sequence[Results]) -> Figure:
    """The training loss over the sequence, one line per strategy (its lowest seed), in the
    strategy's colour: solid, the task's cross-entropy (mean over the optimizer steps since the
    previous point); dashed, the regularizer's penalty (λ/2)·Σ Ω (θ − θ*)² at the point, so the
    loss minimised is their sum. Task boundaries are dashed grey lines; the y axis is logarithmic,
    so zeros (no penalty yet, in the first task) and points without steps are not drawn.
    """
    runs = [group[0] for group in group_by_strategy(_as_list(results)).values()]
    missing = [r["strategy"] for r in runs if "loss" not in (r.get("curves") or {})]
    if missing:
        raise ValueError(f"no training loss recorded for {missing}; rerun with this version")
    fig = Figure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.add_subplot()
    for start in runs[0]["curves"]["task_boundaries"][1:]:
        ax.axvline(start, color="0.35", ls="--", lw=0.8)
    for i, run in enumerate(runs):
        curves, line_color = run["curves"], strategy_color(run["strategy"])
        # Strategies train alike until the first penalty: each line is drawn thinner than the
        # one before and on top of it, so that a curve hidden under another's shows as its rim.
        width = 1.4 + 1.6 * (len(runs) - 1 - i)
        for key, style, what in (("loss", "-", "cross-entropy"), ("penalty", "--", "penalty")):
            values = curves.get(key) or [None] * len(curves["step"])  # naive: no penalty
            points = [(s, v) for s, v in zip(curves["step"], values, strict=True) if v]
            if points:
                steps, values = zip(*points, strict=True)
                label = f"{run['strategy']}: {what}"
                ax.plot(steps, values, style, color=line_color, lw=width, label=label, zorder=2 + i)
    ax.set_yscale("log")
    ax.set(xlabel=STEPS_LABEL, ylabel=LOSS_LABEL)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small")
    ax.set_title(f"Training loss — {runs[0]['benchmark']}")
    ax.grid(alpha=0.3)
    return fig


def plot_accuracy_matrix(results: Results | Sequence[Results]) -> Figure:
    """Heatmap of ``R[i][j]`` in %; several runs of one strategy are averaged."""
    runs = same_tasks(_as_list(results))
    strategies = {r["strategy"] for r in runs}
    if len(strategies) != 1:
        raise ValueError(f"average runs of one strategy at a time, got {sorted(strategies)}")
    matrix = _pct([r["accuracy_matrix"] for r in runs]).mean(axis=0)
    names = runs[0]["task_names"]
    n = len(names)
    fig = Figure(figsize=(1.0 * n + 3.2, 0.8 * n + 2.2), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=100)
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(
            j,
            i,
            f"{value:.1f}",
            ha="center",
            va="center",
            fontsize="small",
            color="black" if value > 60 else "white",
        )
    ax.set_xticks(range(n), names, rotation=30, ha="right")
    ax.set_yticks(range(n), names)
    ax.set(xlabel="evaluated on task j", ylabel="after training task i")
    fig.colorbar(image, ax=ax, label=ACCURACY_LABEL)
    seeds = f" (mean of {len(runs)} seeds)" if len(runs) > 1 else ""
    ax.set_title(f"{runs[0]['strategy']}: accuracy matrix{seeds}")
    return fig


def plot_final_accuracy(results: Sequence[Results]) -> Figure:
    """Grouped bars: each task's accuracy after the whole sequence, per strategy, plus the average.

    Bars are means over a strategy's seeds, error bars the standard deviation.
    """
    runs = list(results)
    summary = final_accuracy_by_strategy(runs)
    groups = [*runs[0]["task_names"], "average"]
    x = np.arange(len(groups))
    width = 0.8 / len(summary)
    fig = Figure(
        figsize=(1.1 * len(groups) * max(1, len(summary) / 2) + 2.5, 3.8), layout="constrained"
    )
    ax = fig.add_subplot()
    for k, (strategy, stats) in enumerate(summary.items()):
        n = stats[0].n
        bars = ax.bar(
            x + (k - (len(summary) - 1) / 2) * width,
            [100 * s.mean for s in stats],
            width,
            yerr=[100 * (s.std or 0.0) for s in stats] if n > 1 else None,
            capsize=3,
            color=strategy_color(strategy),
            label=f"{strategy} (n={n})",
        )
        ax.bar_label(bars, fmt="%.0f", fontsize="x-small", padding=2)
    ax.set_xticks(x, groups)
    ax.set(ylim=(0, 110), xlabel="task", ylabel=f"final {ACCURACY_LABEL}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), title="strategy")
    ax.set_title(f"Accuracy after the last task — {runs[0]['benchmark']}")
    ax.grid(axis="y", alpha=0.3)
    return fig


def plot_lambda_tradeoff(sweep: Mapping[str, Any]) -> Figure:
    """Old-task, new-task and average validation accuracy as the swept value varies (grid points
    whose run failed, marked ``error``, are left out)."""
    points = sorted((p for p in sweep["points"] if "error" not in p), key=lambda p: p["value"])
    values = np.asarray([p["value"] for p in points], dtype=np.float64)
    fig = Figure(figsize=(6.4, 3.8), layout="constrained")
    ax = fig.add_subplot()
    series = (
        ("val_old_acc", "old tasks", "-", color(0)),
        ("val_new_acc", "new task", "-", color(1)),
        ("val_acc", "average", "--", color(6)),
    )
    for key, label, style, line_color in series:
        if all(key in p for p in points):
            accuracy = _pct([p[key] for p in points])
            ax.plot(values, accuracy, style, marker="o", color=line_color, label=label)
    chosen = sweep.get("chosen")
    if chosen is not None:
        ax.axvline(chosen, color=color(3), ls=":", lw=1.5, label=f"chosen: {chosen:g}")
    positive = values[values > 0]
    if values.min() > 0:
        ax.set_xscale("log")
    elif positive.size:  # a zero in the grid: linear around it, logarithmic beyond
        ax.set_xscale("symlog", linthresh=float(positive.min()))
    symbol = "λ" if sweep.get("param") == "lam" else str(sweep.get("param"))
    ax.set(xlabel=f"{symbol} (log scale)", ylabel="validation accuracy (%)", ylim=(0, 101))
    ax.legend(loc="lower left")
    ax.set_title(f"{sweep.get('strategy', '')}: old vs new tasks across the {symbol} grid")
    ax.grid(alpha=0.3)
    return fig


@dataclass(frozen=True)
class FrontierPoint:
    """One strategy at one λ: the accuracy kept on the old tasks and reached on the last one."""

    strategy: str
    lam: float | None
    old: MeanStd  # mean accuracy on the tasks before the last, after the last (kept)
    new: MeanStd  # accuracy on the last task after learning it (learned)


def _old_mean(row: Sequence[float]) -> float:
    return sum(row[:-1]) / max(len(row) - 1, 1)


def frontier_points(results: Sequence[Results]) -> list[FrontierPoint]:
    """Test runs grouped by strategy and λ (``config.lam``; None for naive and joint), each group
    summarised over its seeds, in order of strategy (first appearance) and λ."""
    groups: dict[tuple[str, float | None], list[Results]] = {}
    for r in same_tasks(results):
        groups.setdefault((str(r["strategy"]), r["config"].get("lam")), []).append(r)
    order = list(dict.fromkeys(key[0] for key in groups))
    points = [
        FrontierPoint(
            strategy,
            lam,
            MeanStd.of([_old_mean(r["accuracy_matrix"][-1]) for r in runs]),
            MeanStd.of([r["accuracy_matrix"][-1][-1] for r in runs]),
        )
        for (strategy, lam), runs in groups.items()
    ]
    return sorted(points, key=lambda p: (order.index(p.strategy), p.lam or 0.0))


def sweep_frontier_points(sweep: Mapping[str, Any]) -> list[FrontierPoint]:
    """A λ sweep's validation points (one seed; failed points left out) as frontier points."""
    return [
        FrontierPoint(
            str(sweep.get("strategy")),
            p["value"],
            MeanStd.of([p["val_old_acc"]]),
            MeanStd.of([p["val_new_acc"]]),
        )
        for p in sorted(sweep["points"], key=lambda p: p["value"])
        if "error" not in p
    ]


def plot_frontier(
    points: Sequence[FrontierPoint],
    references: Mapping[str, tuple[float, float]] | None = None,
    data: str = "test",
) -> Figure:
    """The forgetting-learning frontier: the old tasks kept (y) against the last task learned
    (x), one point per strategy and λ (error bars: std over seeds; λ written beside each point),
    a strategy's points joined in order of λ; naive fine-tuning and joint training (no λ) are
    single points. What a user reads λ off: how much of the new task each step of protection
    costs. ``references``: more points by name, ``{name: (new, old)}`` as fractions (e.g. a
    published result); ``data``: which accuracies these are (test, validation)."""
    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = fig.add_subplot()
    labels = 0  # λ labels drawn so far: they alternate above and below their points
    for strategy in dict.fromkeys(p.strategy for p in points):
        mine = [p for p in points if p.strategy == strategy]
        x, y = _pct([p.new.mean for p in mine]), _pct([p.old.mean for p in mine])
        xerr, yerr = (
            _pct([s.std or 0.0 for s in side])
            for side in ([p.new for p in mine], [p.old for p in mine])
        )
        seeds = max(p.old.n for p in mine)
        ink = strategy_color(strategy)
        label = f"{strategy} ({seeds} seed{'s' if seeds > 1 else ''})"
        ax.errorbar(x, y, yerr=yerr, xerr=xerr, fmt="-o", color=ink, capsize=3, ms=5, label=label)
        for p, xi, yi in zip(mine, x, y, strict=True):
            if p.lam is not None:  # clear of the marker and its error bars
                above, labels = labels % 2 == 0, labels + 1
                ax.annotate(
                    f"λ={p.lam:g}",
                    (xi, yi),
                    xytext=(9, 9 if above else -9),
                    textcoords="offset points",
                    va="bottom" if above else "top",
                    fontsize=8,
                    color=ink,
                    bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.7),
                    zorder=4,
                )
    for i, (name, (new, old)) in enumerate((references or {}).items()):
        marker = "*PXD"[i % 4]
        ax.plot(100 * new, 100 * old, marker, ms=12, color=REFERENCE_COLOR, label=name, zorder=5)
    ax.set(
        xlabel=f"last task: {data} accuracy after learning it (%)",
        ylabel=f"earlier tasks: {data} accuracy kept after the last (%)",
    )
    ax.set_title("Forgetting against learning: one point per strategy and λ")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return fig


def plot_importance(results: Results) -> Figure:
    """Where the importance lies: per-layer Fisher histograms and the per-pixel input importance.

    One row per consolidated task. Left: the distribution of each layer's importance values on a
    log scale, as the fraction of the layer's parameters per bin. Right (when recorded): the
    importance of each input pixel as an image.
    """
    entries = results.get("importance") or []
    if not entries:
        raise ValueError(f"no importance recorded for strategy {results.get('strategy')!r}")
    with_image = any("input_importance" in e for e in entries)
    fig = Figure(figsize=(9.0 if with_image else 6.0, 3.2 * len(entries)), layout="constrained")
    axes = fig.subplots(
        len(entries),
        2 if with_image else 1,
        squeeze=False,
        width_ratios=[1.6, 1] if with_image else None,
    )
    names = results["task_names"]
    for row, entry in zip(axes, entries, strict=True):
        task = f"after task {entry['task'] + 1} ({names[entry['task']]})"
        _draw_histograms(row[0], entry["layers"], task)
        if "input_importance" in entry:
            _draw_input_importance(fig, row[1], entry["input_importance"], task)
        elif with_image:
            row[1].set_axis_off()
    fig.suptitle(f"{results['strategy']}: parameter importance (diagonal Fisher)")
    return fig


def _draw_histograms(ax: Axes, layers: Mapping[str, Any], task: str) -> None:
    """One step line per layer; parameters of zero importance (``zeros``) count in the total
    and are named in the legend, since a log axis cannot show them."""
    for k, (name, hist) in enumerate(layers.items()):
        counts = np.asarray(hist["counts"], dtype=np.float64)
        edges = 10.0 ** np.asarray(hist["log10_edges"], dtype=np.float64)
        zeros = hist.get("zeros", 0)
        total = max(counts.sum() + zeros, 1.0)
        layer = hist.get("label", name)  # module path, type and shape, where recorded
        label = f"{layer} ({zeros / total:.0%} zero)" if zeros else layer
        ax.stairs(counts / total, edges, color=color(k), lw=1.5, label=label)
    ax.set_xscale("log")
    ax.set(xlabel="importance F (log scale)", ylabel="fraction of the layer's parameters")
    ax.set_title(task, fontsize="medium")
    ax.legend(fontsize="small", title="layer", title_fontsize="small")
    ax.grid(alpha=0.3)


def _draw_input_importance(fig: Figure, ax: Axes, image: Mapping[str, Any], task: str) -> None:
    values = np.asarray(image["values"], dtype=np.float64).reshape(image["shape"]).squeeze()
    if values.ndim != 2:
        raise ValueError(f"input importance must be a 2-d image, got shape {image['shape']}")
    shown = ax.imshow(values, cmap="viridis")
    ax.set(xticks=[], yticks=[])
    ax.set_title(f"input pixels, {task}", fontsize="medium")
    fig.colorbar(shown, ax=ax, label="summed importance")


# --------------------------------------------------------------------------- output


def figure_bytes(fig: Figure, fmt: str = "png", dpi: int = 150) -> bytes:
    """Render ``fig`` to PNG or SVG bytes; an SVG gets no date and stable ids (reproducible)."""
    buf = io.BytesIO()
    with matplotlib.rc_context({"svg.hashsalt": "ewc"}):
        fig.savefig(buf, format=fmt, dpi=dpi, metadata={"Date": None} if fmt == "svg" else None)
    return buf.getvalue()


def save_figure(
    fig: Figure,
    path: str | os.PathLike[str],
    dpi: int = 150,
    formats: Sequence[str] = ("png", "svg"),
) -> list[Path]:
    """Write ``fig`` as ``<path>.<format>`` for each format, each atomically; return the paths."""
    base = Path(path)
    written = []
    for fmt in formats:
        target = base.parent / f"{base.name}.{fmt}"
        atomic_write_bytes(target, figure_bytes(fig, fmt, dpi))
        written.append(target)
    return written
