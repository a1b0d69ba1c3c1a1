"""In-run checkpoints: a run interrupted after any task resumes and ends bit for bit as a run
never interrupted (CPU), through the library, `ewc run`, and a real `kill -9` of `ewc compare`."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ewc import checkpoint
from ewc.cli import main
from ewc.runner import RunConfig, run

TINY = dict(benchmark="split-digits", hidden=(16,), max_train_samples=60, epochs=2.0)


class _Killed(Exception):
    """Stands for the process dying after a task's checkpoint is written."""


def _die_after(task: int):
    def on_task_end(t: int, accuracies: list[float]) -> None:
        if t == task:
            raise _Killed

    return on_task_end


def _same_results(a: dict, b: dict) -> None:
    for key in ("accuracy_matrix", "random_init_accuracy", "metrics", "importance"):
        assert a[key] == b[key], key
    for key in ("step", "task_boundaries", "accuracy"):
        assert a["curves"][key] == b["curves"][key], key


@functools.cache
def _uninterrupted(strategy: str) -> dict:
    return run(RunConfig(strategy=strategy, **TINY))


@pytest.mark.parametrize("strategy", ["ewc", "online-ewc", "si", "mas", "l2", "kfac", "naive"])
@pytest.mark.parametrize("killed_after", [0, 3])
def test_resumed_run_ends_bit_for_bit_as_an_uninterrupted_one(tmp_path, strategy, killed_after):
    cfg = RunConfig(strategy=strategy, **TINY)
    whole = _uninterrupted(strategy)
    path = tmp_path / "r.ckpt.pt"
    with pytest.raises(_Killed):
        run(cfg, checkpoint=path, on_task_end=_die_after(killed_after))
    finished = []
    resumed = run(cfg, checkpoint=path, on_task_end=lambda t, acc: finished.append(t))
    assert finished == list(range(killed_after + 1, 5))  # resumed, not rerun
    _same_results(whole, resumed)


def test_checkpoint_holds_tensors_and_plain_data_only(tmp_path):
    path = tmp_path / "r.ckpt.pt"
    with pytest.raises(_Killed):
        run(RunConfig(strategy="si", **TINY), checkpoint=path, on_task_end=_die_after(1))
    state = checkpoint.read(path)
    assert state["schema"] == checkpoint.CHECKPOINT_SCHEMA and state["tasks_done"] == 2


def test_checkpoint_of_another_config_is_ignored(tmp_path):
    path = tmp_path / "r.ckpt.pt"
    with pytest.raises(_Killed):
        run(RunConfig(strategy="ewc", lam=1.0, **TINY), checkpoint=path, on_task_end=_die_after(1))
    cfg = RunConfig(strategy="ewc", lam=2.0, **TINY)
    with pytest.warns(UserWarning, match="saved for another config"):
        resumed = run(cfg, checkpoint=path)
    _same_results(run(cfg), resumed)


def test_unreadable_checkpoint_is_ignored(tmp_path):
    path = tmp_path / "r.ckpt.pt"
    path.write_bytes(b"not a checkpoint")
    cfg = RunConfig(strategy="naive", **TINY)
    with pytest.warns(UserWarning, match="ignoring checkpoint .*does not start with the"):
        resumed = run(cfg, checkpoint=path)
    _same_results(run(cfg), resumed)


def test_ewc_run_resumes_from_its_checkpoint_and_removes_it(tmp_path, monkeypatch, capsys):
    out = tmp_path / "r.json"
    argv = ["run", "--benchmark=split-digits", "--hidden=16", "--max-train-samples=60"]
    argv += ["--epochs=2", "--strategy=ewc", "--quiet", "--no-report", f"--out={out}"]
    from ewc.cli import _run_config, build_parser

    cfg = _run_config(build_parser().parse_args(argv))
    with pytest.raises(_Killed):
        run(cfg, checkpoint=checkpoint.checkpoint_path(out), on_task_end=_die_after(2))
    resumed_at = []
    resume = checkpoint.resume

    def recording_resume(*args, **kwargs):
        restored = resume(*args, **kwargs)
        resumed_at.append(None if restored is None else restored[0])
        return restored

    monkeypatch.setattr(checkpoint, "resume", recording_resume)
    assert main(argv) == 0
    assert resumed_at == [3]
    ckpt = checkpoint.checkpoint_path(out)
    said = f"note: resuming {ckpt} after task 3 of 5 (--fresh starts over)\n"
    assert capsys.readouterr().err == said  # one line, and nothing else
    assert main(argv) == 0  # again: the results are read, and it says so
    said = f"note: {out} holds this run's results: read, not rerun (--fresh reruns)\n"
    assert capsys.readouterr().err == said
    assert not checkpoint.checkpoint_path(out).exists()
    _same_results(run(cfg), json.loads(out.read_text()))


@pytest.mark.skipif(sys.platform == "win32", reason="kill -9 is POSIX")
def test_kill_9_during_compare_then_rerun_gives_the_same_results(tmp_path):
    """A real SIGKILL of `ewc compare` as soon as its second run wrote a checkpoint; the same
    command again resumes: naive's results are read, ewc resumes after its last task."""
    argv = ["compare", "--benchmark=permuted-digits", "--tasks=3", "--hidden=16", "--epochs=6"]
    argv += ["--strategies=naive,ewc", "--seeds=0", "--quiet", "--no-report"]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "ewc.cli", *argv, "--threads=1", f"--out={killed}"]
    process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = killed / "ewc-seed0.ckpt.pt"
    deadline = time.monotonic() + 120
    while not ckpt.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert ckpt.exists() and not (killed / "ewc-seed0.json").exists(), "not killed mid-run"
    assert (killed / "naive-seed0.json").exists()

    assert main([*argv, f"--out={killed}"]) == 0
    assert main([*argv, f"--out={whole}"]) == 0
    for name in ("naive-seed0.json", "ewc-seed0.json"):
        _same_results(
            json.loads((whole / name).read_text()), json.loads((killed / name).read_text())
        )
    assert not list(killed.glob("*.ckpt.pt"))


def test_sweep_rerun_reads_its_finished_runs(tmp_path, monkeypatch):
    from ewc.runner import sweep

    config = RunConfig(strategy="ewc", **TINY)
    first = sweep(config, [1.0, 100.0], tmp_path)
    monkeypatch.setattr(
        "ewc.runner.experiments.run", lambda *a, **k: pytest.fail("a finished run reran")
    )
    again = sweep(config, [1.0, 100.0], tmp_path)
    assert again["points"] == first["points"] and again["chosen"] == first["chosen"]
