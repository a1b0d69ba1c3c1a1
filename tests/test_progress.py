"""Progress bars: one per phase, saying what is computed, and nothing (no tqdm needed) when off."""

from __future__ import annotations

import sys

from ewc.progress import Progress
from ewc.runner import RunConfig, run


def test_a_bar_says_what_it_computes_and_counts_its_own_units(capsys):
    with Progress(True, "ewc seed 0").bar("task 1/2 · training", total=7, unit="step") as bar:
        bar.update(7)
    err = capsys.readouterr().err
    assert "ewc seed 0 · task 1/2 · training:" in err and "| 0/7 [" in err  # its own total


def test_iterate_opens_its_bar_at_the_first_item_only(capsys):
    progress = Progress(True, "si seed 0")
    items = progress.iterate([1, 2, 3], "task 1/2 · importance", total=3, unit="batch")
    assert capsys.readouterr().err == ""  # nothing consumed: no bar (SI ignores the batches)
    assert list(items) == [1, 2, 3] and list(items) == [1, 2, 3]  # re-iterable, as given
    err = capsys.readouterr().err
    assert err.count("si seed 0 · task 1/2 · importance:") >= 2 and "| 0/3 [" in err  # per pass


def test_disabled_progress_needs_no_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # as if the cli extra were missing
    progress = Progress(False, "naive seed 0")
    with progress.bar("task 1/1 · training", total=2, unit="step") as bar:
        bar.update()
    items = [1, 2]
    assert progress.iterate(items, "x", total=2, unit="batch") is items
    assert capsys.readouterr().err == ""


def _bars(err: str) -> set[str]:
    """The descriptions of the bars shown (tqdm writes ``\\r<desc>: <percent>|...``)."""
    return {line.split(":")[0] for line in err.split("\r") if "%|" in line}


def test_every_phase_of_a_run_has_a_bar_that_says_what_it_computes(capsys):
    tiny = dict(benchmark="permuted-digits", n_tasks=2, scenario="domain", hidden=(16,))
    run(RunConfig(**tiny, strategy="ewc", iterations=12, fisher_samples=100), progress=True)
    assert _bars(capsys.readouterr().err) == {
        "ewc seed 0 · task 1/2 permuted-1 · training",
        "ewc seed 0 · task 1/2 · exact Fisher on 100 samples",
        "ewc seed 0 · task 1/2 · testing on every task",
        "ewc seed 0 · task 2/2 permuted-2 · training",
        "ewc seed 0 · task 2/2 · testing on every task",
    }
    run(RunConfig(**tiny, strategy="si", iterations=12), progress=True)
    assert not any("importance" in b or "Fisher" in b for b in _bars(capsys.readouterr().err))
