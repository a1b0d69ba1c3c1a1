"""Run settings from flags and config files reach the runs; bad ones, and bad outputs, stop the
command before any work."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest

from ewc.cli import main
from ewc.runner import sweep

TINY = ["--benchmark", "split-digits", "--hidden", "8", "--max-train-samples", "40", "--quiet"]


def _never_run(*args: object, **kwargs: object) -> None:
    raise AssertionError("a run started")


def test_yaml_scientific_notation_reaches_the_run(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("strategy: ewc\nlam: 1e4\nlr: 1e-3\nepochs: 1\n")
    out = tmp_path / "r.json"
    assert main(["run", *TINY, "--config", str(cfg), "--no-report", "--out", str(out)]) == 0
    config = json.loads(out.read_text())["config"]
    assert (config["lam"], config["lr"]) == (1e4, 1e-3)


def test_compare_takes_strategy_and_seed_from_the_config_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("strategy: si\nseed: 3\nepochs: 1\n")
    out = tmp_path / "cmp"
    assert main(["compare", *TINY, "--config", str(cfg), "--no-report", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*-seed*.json")) == ["si-seed3.json"]


def test_iterations_on_the_command_line_replace_the_files_epochs(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("strategy: naive\nepochs: 5\n")
    out = tmp_path / "r.json"
    argv = ["run", *TINY, "--config", str(cfg), "--iterations", "3", "--no-report"]
    assert main([*argv, "--out", str(out)]) == 0
    config = json.loads(out.read_text())["config"]
    assert (config["epochs"], config["iterations"]) == (None, 3)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--out", "{file}/r.json"], "which is a file"),
        (["run", "--out", "{folder}.json"], "is a folder; name a file"),
        (["compare", "--out", "{file}"], "is a file; name a folder"),
        (["sweep", "--grid", "1,2", "--out", "{file}"], "is a file; name a folder"),
        (["run", "--log-dir", "{file}/logs", "--out", "r.json"], "which is a file"),
        (["compare", "--log-dir", "{file}", "--out", "c"], "is a file; name a folder"),
        (["run", "--threads", "0", "--out", "r.json"], "--threads: expected an integer from 1"),
        (["run", "--gamma", "0.5", "--strategy", "ewc", "--out", "r.json"], "gamma=0.5 is read"),
        (
            ["compare", "--strategies", "naive,naive", "--out", "c"],
            "'naive' with seed 0 is given twice",
        ),
        (["compare", "--seeds", "0,0.0", "--out", "c"], "'naive' with seed 0 is given twice"),
        (["sweep", "--strategy", "naive", "--grid", "1,2", "--out", "s"], "lam=1.0 is read only"),
        (["sweep", "--param", "seed", "--grid", "1,2", "--out", "s"], "cannot sweep 'seed'"),
        (["sweep", "--grid", "1e3,1000", "--out", "s"], "lam=1000.0 is in the grid twice"),
    ],
)
def test_bad_settings_and_outputs_stop_before_any_work(
    argv, message, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("")
    (tmp_path / "a-folder.json").mkdir()
    argv = [a.format(file="a-file", folder="a-folder") for a in argv]
    with mock.patch("ewc.runner.experiments.run", _never_run):
        try:
            code = main([*argv[:1], *TINY, *argv[1:]])
        except SystemExit as e:  # argparse's own errors
            code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_sweep_values_that_print_alike_get_their_own_files(tmp_path):
    from ewc.runner import RunConfig

    config = RunConfig(benchmark="split-digits", hidden=(8,), max_train_samples=40, epochs=1.0)
    summary = sweep(config, [1e-4, 1.00000001e-4], tmp_path)
    files = sorted(p.name for p in Path(tmp_path).glob("lam=*.json"))
    assert files == ["lam=0.0001.json", "lam=0.000100000001.json"]
    assert [p["value"] for p in summary["points"]] == [1e-4, 1.00000001e-4]


def test_a_validation_split_that_leaves_no_training_data_is_refused(tmp_path, capsys):
    """Known only once the data are loaded: refused then, before any step."""
    argv = ["sweep", *TINY, "--val-fraction", "0.999", "--grid", "1", "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "val_fraction: 0.999 of 288 training samples holds out 288" in err
    assert not list(tmp_path.glob("*.json"))


def test_compare_leaves_a_setting_at_its_default_for_strategies_that_do_not_read_it(tmp_path):
    from ewc.runner import RunConfig, compare

    config = RunConfig(
        benchmark="split-digits", hidden=(8,), max_train_samples=40, epochs=1.0, gamma=0.5
    )
    results = compare(config, ["ewc", "online-ewc"], [0], tmp_path)
    assert [r["config"]["gamma"] for r in results] == [1.0, 0.5]


def test_a_diverged_run_is_an_error_and_a_failed_sweep_point(tmp_path, capsys):
    from ewc.runner import RunConfig

    argv = ["run", *TINY, "--epochs=1", "--strategy=naive", "--optimizer=sgd", "--lr=1e30"]
    assert main([*argv, "--no-report", f"--out={tmp_path / 'r.json'}"]) == 2
    assert "while training task" in capsys.readouterr().err
    config = RunConfig(
        benchmark="split-digits",
        strategy="naive",
        optimizer="sgd",
        hidden=(8,),
        max_train_samples=40,
        epochs=1.0,
    )
    summary = sweep(config, [1e30, 0.05], tmp_path, param="lr")
    assert "(lr) or the penalty (lam) is too large" in summary["points"][0]["error"]
    assert summary["points"][0]["diverged"] and summary["chosen"] == 0.05
