"""Training curves as they are recorded and logged: the loss and the penalty's share in the
results, and ``log_dir``'s CSV and TensorBoard event files, written while the run trains."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ewc._optional import MissingExtraWarning
from ewc.cli import main
from ewc.curves import Curves
from ewc.logger import CSV_NAME, ScalarLogger
from ewc.runner import RunConfig, run

TASKS = ["a", "b"]


def _csv_rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / CSV_NAME, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _events(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files of ``folder``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def test_curves_average_the_loss_of_the_steps_since_the_last_point():
    curves = Curves(TASKS, penalty=True)
    curves.point(0, [0.1, 0.2], torch.tensor(0.0))
    for loss in (3.0, 2.0, 1.0):
        curves.add_loss(torch.tensor(loss))
    curves.point(3, [0.5, 0.2], torch.tensor(0.25))
    curves.point(3, [0.5, 0.2], torch.tensor(0.25))  # no step since: no loss
    assert curves.to_dict() == {
        "step": [0, 3, 3],
        "task_boundaries": [],
        "accuracy": [[0.1, 0.2], [0.5, 0.2], [0.5, 0.2]],
        "loss": [None, 2.0, None],
        "penalty": [0.0, 0.25, 0.25],
    }


def test_curves_without_a_regularizer_have_no_penalty():
    curves = Curves(TASKS, penalty=False)
    curves.point(0, [0.1, 0.2], None)
    assert "penalty" not in curves.to_dict()


def test_logger_writes_the_same_scalars_to_csv_and_tensorboard_as_it_goes(tmp_path):
    with ScalarLogger(tmp_path / "logs") as logger:
        curves = Curves(TASKS, penalty=True, logger=logger)
        curves.point(0, [0.125, 0.5], torch.tensor(0.0))
        curves.add_loss(torch.tensor(0.75))
        curves.point(1, [0.25, 0.5], torch.tensor(0.5))
        rows = _csv_rows(tmp_path / "logs")  # before close: flushed at every point
    written = [(int(r["step"]), r["tag"], float(r["value"])) for r in rows]
    assert written == [
        (0, "loss/penalty", 0.0),
        (0, "accuracy/a", 12.5),
        (0, "accuracy/b", 50.0),
        (1, "loss/cross_entropy", 0.75),
        (1, "loss/penalty", 0.5),
        (1, "accuracy/a", 25.0),
        (1, "accuracy/b", 50.0),
    ]
    events = _events(tmp_path / "logs")
    assert set(events) == {tag for _, tag, _ in written}
    for step, tag, value in written:
        assert (step, pytest.approx(value)) in events[tag]


def test_logger_without_tensorboard_writes_the_csv_and_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with (
        pytest.warns(MissingExtraWarning, match=r"scalars.csv only.*'ewc\[tensorboard\]'"),
        ScalarLogger(tmp_path / "logs") as logger,
    ):
        logger.log(3, {"loss/penalty": 0.5})
    assert [(r["step"], r["tag"]) for r in _csv_rows(tmp_path / "logs")] == [("3", "loss/penalty")]
    assert [p.name for p in (tmp_path / "logs").iterdir()] == [CSV_NAME]


def test_task_names_with_slashes_are_one_tag_level(tmp_path):
    with ScalarLogger(tmp_path / "logs") as logger:
        Curves(["0/1", "2/3"], penalty=False, logger=logger).point(0, [0.5, 0.25], None)
    assert [r["tag"] for r in _csv_rows(tmp_path / "logs")] == ["accuracy/0-1", "accuracy/2-3"]


# --------------------------------------------------------------------------- in a run

TINY = dict(benchmark="permuted-digits", n_tasks=2, scenario="domain", hidden=(16,))


def _tiny(strategy: str, **kw: Any) -> RunConfig:
    return RunConfig(**TINY, strategy=strategy, iterations=30, eval_every=10, **kw)


def test_a_run_records_its_loss_and_the_penalty_at_every_curve_point():
    curves = run(_tiny("ewc", lam=1e3))["curves"]
    steps, loss, penalty = curves["step"], curves["loss"], curves["penalty"]
    assert len(loss) == len(penalty) == len(steps) == len(curves["accuracy"])
    no_step_since = [i == 0 or steps[i] == steps[i - 1] for i in range(len(steps))]
    assert [v is None for v in loss] == no_step_since
    assert all(v > 0 for v in loss if v is not None)
    assert all(p == 0 for s, p in zip(steps, penalty, strict=True) if s <= 30)  # task 1: none
    assert all(p > 0 for s, p in zip(steps, penalty, strict=True) if s > 30)  # pulled back
    assert "penalty" not in run(_tiny("naive"))["curves"]


def test_log_dir_is_written_while_the_run_trains(tmp_path):
    seen: list[int] = []

    def after_task(t: int, accuracies: list[float]) -> None:
        seen.append(len(_csv_rows(tmp_path / "logs")))

    result = run(_tiny("ewc", lam=1e3), on_task_end=after_task, log_dir=tmp_path / "logs")
    rows = _csv_rows(tmp_path / "logs")
    assert 0 < seen[0] < seen[1] <= len(rows)  # rows were there after the first task already
    curves = result["curves"]
    # One row per step and tag: a task's first point, at the step of the previous task's test
    # point, is not logged again.
    steps = curves["step"]
    logged_points = [i for i, s in enumerate(steps) if i == 0 or s != steps[i - 1]]
    assert len(logged_points) < len(steps)
    logged = [(int(r["step"]), float(r["value"])) for r in rows if r["tag"] == "loss/penalty"]
    assert logged == [(steps[i], pytest.approx(curves["penalty"][i])) for i in logged_points]
    events = _events(tmp_path / "logs")
    first_task = f"accuracy/{result['task_names'][0]}"
    accuracy = curves["accuracy"]
    assert events[first_task] == [
        (steps[i], pytest.approx(100 * accuracy[i][0])) for i in logged_points
    ]


def test_compare_gives_each_run_its_own_log_folder(tmp_path, capsys):
    argv = ["compare", "--benchmark", "permuted-digits", "--tasks", "2", "--scenario", "domain"]
    argv += ["--hidden", "16", "--iterations", "20", "--quiet", "--no-report"]
    argv += ["--strategies", "naive,ewc", "--out", str(tmp_path / "out")]
    assert main([*argv, "--log-dir", str(tmp_path / "logs")]) == 0
    for name in ("naive-seed0", "ewc-seed0"):
        folder = tmp_path / "logs" / name
        assert _csv_rows(folder) and list(folder.glob("events.out.tfevents.*"))


def test_a_resumed_run_logs_the_whole_run(tmp_path):
    """Killed after the first task and resumed from its checkpoint, the run's CSV holds every
    curve point once, as an uninterrupted run's does (the restored points are logged again)."""

    class Killed(Exception):
        pass

    def die(t: int, accuracies: list[float]) -> None:
        raise Killed

    config, logs, ckpt = _tiny("ewc", lam=1e3), tmp_path / "logs", tmp_path / "r.ckpt.pt"
    with pytest.raises(Killed):
        run(config, on_task_end=die, log_dir=logs, checkpoint=ckpt)
    result = run(config, log_dir=logs, checkpoint=ckpt)
    steps = [int(r["step"]) for r in _csv_rows(logs) if r["tag"] == "loss/penalty"]
    assert steps == sorted(set(result["curves"]["step"]))  # each step once
    assert len(list(logs.glob("events.out.tfevents.*"))) == 1  # the killed process's removed
