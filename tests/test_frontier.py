"""The forgetting-learning frontier: points per strategy and λ over seeds, from runs and from a
sweep, and the script that draws the README's figure."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from ewc.plots import frontier_points, plot_frontier, sweep_frontier_points
from ewc.results import save_results
from ewc.runner import RunConfig, run

ROOT = Path(__file__).parents[1]


def fake(strategy: str, lam: float | None, seed: int, last_row: list[float]) -> dict:
    """The parts of a results dict the frontier reads."""
    return {
        "strategy": strategy,
        "seed": seed,
        "config": {"lam": lam},
        "task_names": ["a", "b", "c"],
        "accuracy_matrix": [last_row, last_row, last_row],
    }


def test_points_are_means_over_seeds_per_strategy_and_lambda() -> None:
    runs = [
        fake("ewc", 1e4, 0, [0.6, 0.8, 0.9]),
        fake("naive", None, 0, [0.1, 0.3, 0.99]),
        fake("ewc", 1e2, 0, [0.2, 0.4, 0.97]),
        fake("ewc", 1e4, 1, [0.5, 0.7, 0.8]),
    ]
    points = frontier_points(runs)
    assert [(p.strategy, p.lam) for p in points] == [("ewc", 1e2), ("ewc", 1e4), ("naive", None)]
    strong = points[1]
    assert strong.old.n == strong.new.n == 2
    assert strong.old.mean == pytest.approx(statistics.mean([0.7, 0.6]))
    assert strong.old.std == pytest.approx(statistics.stdev([0.7, 0.6]))
    assert strong.new.mean == pytest.approx(0.85)
    assert points[0].old.std is None  # one seed: no spread to draw
    plot_frontier(points, {"paper": (0.9, 0.6)})  # draws without error


def test_a_sweep_becomes_one_point_per_finished_value() -> None:
    sweep = json.loads((ROOT / "tests" / "data" / "report" / "sweep.json").read_text())
    sweep["points"].append({"value": 1e9, "error": "diverged"})
    points = sweep_frontier_points(sweep)
    finished = sorted((p for p in sweep["points"] if "error" not in p), key=lambda p: p["value"])
    assert [p.lam for p in points] == [p["value"] for p in finished]
    assert [p.old.mean for p in points] == [p["val_old_acc"] for p in finished]
    assert [p.new.mean for p in points] == [p["val_new_acc"] for p in finished]


def test_the_frontier_script_writes_one_png(tmp_path: Path) -> None:
    tiny = dict(benchmark="permuted-digits", n_tasks=2, scenario="domain", hidden=(16,))
    paths = []
    for strategy, lam in (("naive", None), ("ewc", 1.0), ("ewc", 1e3)):
        for seed in (0, 1):
            config = RunConfig(**tiny, strategy=strategy, lam=lam, iterations=20, seed=seed)
            paths.append(save_results(run(config), tmp_path / f"{strategy}-{lam}-{seed}.json"))
    out = tmp_path / "figure" / "frontier"
    script = ROOT / "scripts" / "make_frontier_figure.py"
    flags = ["--reference", "a paper=0.9,0.5", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, str(script), *map(str, paths), *flags],
        capture_output=True,
        text=True,
        check=True,
        env={"MPLBACKEND": "Agg", "PATH": ""},
    )
    lines = done.stdout.splitlines()
    assert len(lines) == 4 and lines[-1] == str(out.with_suffix(".png"))
    assert [p.name for p in out.parent.iterdir()] == ["frontier.png"]


def test_lambda_labels_stay_clear_of_the_markers():
    """Each λ label's box lies beside its point, clear of its marker and of the error bar
    through it (docs/frontier.png had them on the bars), alternating above and below."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from ewc.plots import FrontierPoint
    from ewc.tables import MeanStd

    points = [
        FrontierPoint("ewc", lam, MeanStd.of([old, old + 0.02]), MeanStd.of([new, new + 0.01]))
        for lam, old, new in ((1e3, 0.5, 0.97), (1e4, 0.6, 0.95), (1e5, 0.7, 0.9))
    ]
    fig = plot_frontier(points)
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    (ax,) = fig.axes
    labels = [t for t in ax.texts if t.get_text().startswith("λ=")]
    assert len(labels) == 3
    for label, p in zip(labels, points, strict=True):
        box = label.get_window_extent(renderer)
        x, y = ax.transData.transform((100 * p.new.mean, 100 * p.old.mean))
        assert not box.contains(x, y) and box.x0 > x + 5  # right of the marker
        assert box.y0 > y + 3 or box.y1 < y - 3  # clear of the error bar through the point
