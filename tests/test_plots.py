"""Figures from results dicts: structure of every plot, the seed summary, and saving.

The fixtures in tests/data/report/ are synthetic results files (schema ewc.results/1) of a
three-task stream: strategies "naive" and "ewc", seeds 0 and 1, with accuracy curves, and
importance histograms plus an 8x8 input-importance image for "ewc"; and one ewc.sweep/1 file.
"""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path
from typing import Any

import matplotlib.colors
import numpy as np
import pytest
from matplotlib.container import BarContainer, ErrorbarContainer
from matplotlib.figure import Figure

from ewc import plots

DATA = Path(__file__).parent / "data" / "report"
N_TASKS = 3


@pytest.fixture(scope="module")
def runs() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(DATA.glob("*-seed*.json"))]


@pytest.fixture(scope="module")
def sweep() -> dict[str, Any]:
    return json.loads((DATA / "sweep.json").read_text())


def _of(runs: list[dict[str, Any]], strategy: str) -> list[dict[str, Any]]:
    return [r for r in runs if r["strategy"] == strategy]


def _task_lines(fig: Figure) -> list[int]:
    """Per axes, how many labelled (legend) lines it holds."""
    return [len(ax.get_legend_handles_labels()[1]) for ax in fig.axes]


# --------------------------------------------------------------------------- summaries


def test_final_accuracy_by_strategy_mean_and_sample_std(runs):
    summary = plots.final_accuracy_by_strategy(runs)
    assert list(summary) == ["ewc", "naive"]  # first appearance (files sorted by name)
    for strategy, stats in summary.items():
        last = np.array([r["accuracy_matrix"][-1] for r in _of(runs, strategy)])
        assert len(stats) == N_TASKS + 1 and {s.n for s in stats} == {2}
        assert [s.mean for s in stats] == pytest.approx([*last.mean(axis=0), last.mean()])
        assert stats[0].std == pytest.approx(statistics.stdev(last[:, 0]))


def test_format_percent():
    assert (
        plots.MeanStd.of([0.5, 0.6]).percent()
        == f"55.00 ± {100 * statistics.stdev([0.5, 0.6]):.2f}"
    )
    assert plots.MeanStd.of([0.123]).percent() == "12.30"
    assert plots.format_percent(-0.05, 0.001, digits=2) == "-5.00 ± 0.10"
    assert plots.format_percent(None) == "n/a"


def test_runs_of_different_task_sequences_are_not_mixed(runs):
    other = copy.deepcopy(runs[0])
    other["task_names"] = ["a", "b", "c"]
    with pytest.raises(ValueError, match="different task sequences"):
        plots.final_accuracy_by_strategy([runs[0], other])


# --------------------------------------------------------------------------- figures


def test_accuracy_curves_one_panel_per_strategy(runs):
    fig = plots.plot_accuracy_curves(runs)
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 2
    assert _task_lines(fig) == [N_TASKS, N_TASKS]
    for ax in fig.axes:
        # one line per task plus a dashed line at each of the two inner task boundaries
        assert len(ax.lines) == N_TASKS + N_TASKS - 1
        assert len(ax.patches) == N_TASKS  # shaded task spans
        assert ax.get_ylim() == fig.axes[0].get_ylim()
        assert ax.get_xlabel() == plots.STEPS_LABEL
    assert fig.axes[0].get_ylabel() == plots.ACCURACY_LABEL
    curve = fig.axes[0].lines[-1].get_ydata()
    strategy = fig.axes[0].get_title().split()[0]
    expected = 100 * np.array(_of(runs, strategy)[0]["curves"]["accuracy"])[:, -1]
    assert curve == pytest.approx(expected)


def test_accuracy_curves_of_a_single_run(runs):
    fig = plots.plot_accuracy_curves(runs[0])
    assert len(fig.axes) == 1


def test_accuracy_curves_need_curves(runs):
    bare = {**runs[0], "curves": None}
    with pytest.raises(ValueError, match="no accuracy curves"):
        plots.plot_accuracy_curves([bare])


def test_accuracy_matrix_heatmap_averages_seeds(runs):
    ewc_runs = _of(runs, "ewc")
    fig = plots.plot_accuracy_matrix(ewc_runs)
    ax, _colorbar = fig.axes
    (image,) = ax.images
    expected = 100 * np.mean([r["accuracy_matrix"] for r in ewc_runs], axis=0)
    assert np.asarray(image.get_array()) == pytest.approx(expected)
    assert len(ax.texts) == N_TASKS * N_TASKS
    assert [t.get_text() for t in ax.get_xticklabels()] == ewc_runs[0]["task_names"]
    assert "mean of 2 seeds" in ax.get_title()


def test_accuracy_matrix_refuses_to_mix_strategies(runs):
    with pytest.raises(ValueError, match="one strategy"):
        plots.plot_accuracy_matrix(runs)


def test_final_accuracy_bars_with_error_bars(runs):
    fig = plots.plot_final_accuracy(runs)
    (ax,) = fig.axes
    groups = N_TASKS + 1  # tasks and the average
    assert len(ax.patches) == 2 * groups
    assert [t.get_text() for t in ax.get_xticklabels()][-1] == "average"
    summary = plots.final_accuracy_by_strategy(runs)
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    for container, stats in zip(bars, summary.values(), strict=True):
        heights = [bar.get_height() for bar in container]
        assert heights == pytest.approx([100 * s.mean for s in stats])
        assert container.errorbar is not None
    assert {t.get_text() for t in ax.get_legend().get_texts()} == {"naive (n=2)", "ewc (n=2)"}


def test_final_accuracy_single_seed_has_no_error_bars(runs):
    fig = plots.plot_final_accuracy([runs[0]])
    assert not any(isinstance(c, ErrorbarContainer) for c in fig.axes[0].containers)


def test_lambda_tradeoff_lines_and_chosen_value(sweep):
    fig = plots.plot_lambda_tradeoff(sweep)
    (ax,) = fig.axes
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["old tasks", "new task", "average", "chosen: 100"]
    assert ax.get_xscale() == "log"
    assert list(ax.lines[0].get_xdata()) == sweep["grid"]


def test_lambda_tradeoff_with_zero_in_grid(sweep):
    points = [
        {"value": 0, "val_acc": 0.5, "val_old_acc": 0.1, "val_new_acc": 0.9},
        *sweep["points"],
    ]
    fig = plots.plot_lambda_tradeoff({**sweep, "points": points})
    assert fig.axes[0].get_xscale() == "symlog"


def test_importance_histograms_and_input_image(runs):
    run = _of(runs, "ewc")[0]
    fig = plots.plot_importance(run)
    entries = len(run["importance"])
    histograms = [ax for ax in fig.axes if ax.patches]
    images = [ax for ax in fig.axes if ax.images]
    assert len(histograms) == entries and len(images) == entries
    assert len(fig.axes) == 3 * entries  # histogram, image and its colorbar per task
    for ax in histograms:
        assert len(ax.patches) == len(run["importance"][0]["layers"])
        assert ax.get_xscale() == "log"
    assert images[0].images[0].get_array().shape == (8, 8)


def test_importance_counts_zero_importance_parameters(runs):
    run = copy.deepcopy(_of(runs, "ewc")[0])
    layer = run["importance"][0]["layers"]["0.bias"]
    layer["zeros"] = sum(layer["counts"])  # as many zeros as non-zeros: fractions halve
    ax = plots.plot_importance(run).axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert labels[1] == "0.bias (50% zero)"
    assert ax.patches[1].get_data().values.sum() == pytest.approx(0.5)


def test_importance_without_input_image(runs):
    run = copy.deepcopy(_of(runs, "ewc")[0])
    for entry in run["importance"]:
        del entry["input_importance"]
    fig = plots.plot_importance(run)
    assert len(fig.axes) == len(run["importance"])
    assert not any(ax.images for ax in fig.axes)


def test_importance_needs_importance(runs):
    with pytest.raises(ValueError, match="no importance"):
        plots.plot_importance(_of(runs, "naive")[0])


# --------------------------------------------------------------------------- saving


def test_save_figure_writes_png_and_svg(tmp_path, sweep):
    paths = plots.save_figure(plots.plot_lambda_tradeoff(sweep), tmp_path / "out" / "lambda.seed0")
    png, svg = paths
    assert [p.name for p in paths] == ["lambda.seed0.png", "lambda.seed0.svg"]
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert b"<svg" in svg.read_bytes()
    assert sorted(p.name for p in png.parent.iterdir()) == ["lambda.seed0.png", "lambda.seed0.svg"]


def test_svg_output_is_reproducible(sweep):
    fig = plots.plot_lambda_tradeoff(sweep)
    assert plots.figure_bytes(fig, "svg") == plots.figure_bytes(fig, "svg")


# --------------------------------------------------------------------------- colours, loss, labels


def _bar_colors(fig: Figure) -> dict[str, tuple]:
    ax = fig.axes[0]
    bars = [c for c in ax.containers if isinstance(c, BarContainer)]
    return {c.get_label().split()[0]: c.patches[0].get_facecolor() for c in bars}


def test_a_strategy_keeps_its_colour_whatever_the_order_or_company(runs):
    naive_first = _bar_colors(plots.plot_final_accuracy(_of(runs, "naive") + _of(runs, "ewc")))
    ewc_first = _bar_colors(plots.plot_final_accuracy(_of(runs, "ewc") + _of(runs, "naive")))
    alone = _bar_colors(plots.plot_final_accuracy(_of(runs, "naive")))
    assert naive_first == ewc_first and alone["naive"] == naive_first["naive"]
    assert naive_first["naive"] == matplotlib.colors.to_rgba(plots.STRATEGY_COLORS["naive"])
    assert naive_first["naive"] != naive_first["ewc"]


def test_every_strategy_has_its_own_colour_and_other_names_a_stable_one():
    assert len(set(plots.STRATEGY_COLORS.values())) == len(plots.STRATEGY_COLORS)
    assert plots.strategy_color("my-method") == plots.strategy_color("my-method")
    assert plots.strategy_color("my-method") in plots.PALETTE


def _with_loss(run: dict[str, Any]) -> dict[str, Any]:
    """``run`` with a synthetic loss curve (and a penalty for ewc) at its curve points."""
    run = copy.deepcopy(run)
    n = len(run["curves"]["step"])
    run["curves"]["loss"] = [None, *(1.0 / k for k in range(1, n))]
    if run["strategy"] == "ewc":
        run["curves"]["penalty"] = [0.0] * (n // 2) + [0.01 * k for k in range(1, n - n // 2 + 1)]
    return run


def test_training_loss_lines_in_each_strategys_colour(runs):
    seed0 = [_with_loss(r) for r in runs if r["seed"] == 0]
    (ax,) = plots.plot_training_loss(seed0).axes
    labels = ax.get_legend_handles_labels()[1]
    assert sorted(labels) == ["ewc: cross-entropy", "ewc: penalty", "naive: cross-entropy"]
    lines = {line.get_label(): line for line in ax.get_lines() if line.get_label()[0] != "_"}
    for label, line in lines.items():
        assert line.get_color() == plots.strategy_color(label.split(":")[0])
    ewc_run = _of(seed0, "ewc")[0]
    loss = lines["ewc: cross-entropy"]
    assert list(loss.get_ydata()) == ewc_run["curves"]["loss"][1:]  # the first point has no steps
    penalty = lines["ewc: penalty"]
    assert list(penalty.get_ydata()) == [v for v in ewc_run["curves"]["penalty"] if v > 0]
    assert ax.get_yscale() == "log"


def test_training_loss_needs_a_recorded_loss(runs):
    with pytest.raises(ValueError, match="no training loss recorded"):
        plots.plot_training_loss(runs)


def test_importance_legend_shows_recorded_layer_labels(runs):
    run = copy.deepcopy(_of(runs, "ewc")[0])
    run["importance"][0]["layers"]["0.bias"]["label"] = "0: Linear.bias (16)"
    labels = plots.plot_importance(run).axes[0].get_legend_handles_labels()[1]
    assert labels[1] == "0: Linear.bias (16)"


def _renamed(run: dict[str, Any], strategy: str) -> dict[str, Any]:
    return {**run, "strategy": strategy}


def test_accuracy_curves_of_many_strategies_wrap_into_readable_rows(runs):
    """Seven strategies: three panels a row, as wide as each panel of a two-strategy figure."""
    names = ["naive", "joint", "ewc", "online-ewc", "si", "mas", "l2"]
    fig = plots.plot_accuracy_curves([_renamed(runs[0], s) for s in names])
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert len(shown) == 7 and len(fig.axes) == 9  # 3 x 3, the last two places hidden
    assert [ax.get_title().split()[0] for ax in shown] == names
    assert fig.get_figwidth() == plots.plot_accuracy_curves(runs[:1]).get_figwidth() + 2 * 4.8
    assert fig.get_figheight() == 3 * 3.8
    assert all(ax.get_ylabel() == plots.ACCURACY_LABEL for ax in shown[::3])


def test_identical_loss_curves_both_stay_visible(runs):
    """naive and EWC train alike before the first penalty: the curve drawn first is wider and
    under the other, so neither hides the other."""
    run = _with_loss(runs[0])
    (ax,) = plots.plot_training_loss([_renamed(run, "naive"), _renamed(run, "ewc")]).axes
    lines = {line.get_label(): line for line in ax.get_lines() if line.get_label()[0] != "_"}
    under, over = lines["naive: cross-entropy"], lines["ewc: cross-entropy"]
    assert list(under.get_ydata()) == list(over.get_ydata())
    assert under.get_linewidth() > over.get_linewidth() and under.get_zorder() < over.get_zorder()
