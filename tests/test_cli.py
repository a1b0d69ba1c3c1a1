"""The command line, run in-process through ewc.cli.main (fast settings on offline digits)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import ewc
from ewc.cli import _demo_eta, main
from ewc.runner import RunConfig

FAST = ["--benchmark", "split-digits", "--epochs", "1", "--hidden", "32", "--quiet"]


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"ewc {ewc.__version__}"


def test_console_script_help():
    out = subprocess.run(
        [sys.executable, "-m", "ewc.cli", "run", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--fisher" in out and "--lam" in out and "--benchmark" in out


def test_run_writes_results_and_report(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["run", *FAST, "--strategy", "ewc", "--lam", "100", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["config"]["lam"] == 100 and result["strategy"] == "ewc"
    assert out.with_suffix(".html").exists()
    printed = capsys.readouterr().out
    assert "| ewc | 1 |" in printed and "report:" in printed


def test_printed_paths_open_from_where_the_user_stands(tmp_path, capsys, monkeypatch):
    """An absolute ``--out`` below the working folder is printed relative to it (``cd .. && bash
    ewc/scripts/demo.sh`` prints ``ewc/runs/demo/report.html``), one elsewhere as it is."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "ewc" / "runs" / "r.json"
    assert main(["run", *FAST, "--strategy", "naive", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "results: ewc/runs/r.json\n" in printed and "report: ewc/runs/r.html\n" in printed
    monkeypatch.chdir(tmp_path / "ewc" / "runs")
    assert main(["report", str(out), "--out", str(tmp_path / "r.html")]) == 0
    assert f"report: {tmp_path / 'r.html'}\n" in capsys.readouterr().out


def test_compare_with_config_file(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("benchmark: split-digits\nepochs: 1\nhidden: [32]\nscenario: domain\n")
    out = tmp_path / "cmp"
    argv = [
        "compare",
        "--config",
        str(cfg),
        "--strategies",
        "naive,ewc",
        "--seeds",
        "0,1",
        "--quiet",
        "--no-report",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert len(list(out.glob("*-seed*.json"))) == 4
    summary = (out / "summary.md").read_text()
    assert "| naive | 2 |" in summary and "| ewc | 2 |" in summary
    assert json.loads((out / "ewc-seed1.json").read_text())["scenario"] == "domain"


def test_toml_config_and_command_line_wins(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('benchmark = "split-digits"\nepochs = 1\nhidden = [16]\nlr = 0.5\n')
    out = tmp_path / "r.json"
    argv = [
        "run",
        "--config",
        str(cfg),
        "--lr",
        "0.002",
        "--strategy",
        "naive",
        "--quiet",
        "--no-report",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert json.loads(out.read_text())["config"]["lr"] == 0.002


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--benchmark", "nope", "--out", "x.json"], "Unknown benchmark 'nope'"),
        (["run", *FAST, "--strategy", "ewx", "--out", "x.json"], "unknown strategy 'ewx'"),
        (["run", *FAST, "--scenario", "cls", "--out", "x.json"], "cls"),
        (["run", *FAST, "--out", "x.txt"], "--out must name a .json file"),
        (["sweep", *FAST, "--grid", ",", "--out", "d"], "--grid is empty"),
        (["compare", *FAST, "--seeds", "a", "--out", "d"], "seed: expected an integer, got 'a'"),
        (["report", "missing.json", "--out", "r.html"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["run", "--stratgy", "ewc"],
            "ewc run: error: unrecognized arguments: --stratgy ewc; "
            "did you mean --strategy? (see ewc run --help)",
        ),
        (["run", "--gama", "0.5"], "did you mean --gamma?"),
        (["run", "--lamda=3"], "did you mean --lam?"),
        (
            ["demo", "--fats"],
            "ewc demo: error: unrecognized arguments: --fats; did you mean "
            "--fast? (see ewc demo --help)",
        ),
        (["compare", "--strategy", "ewc"], "did you mean --strategies?"),
        (["sweep", "--grdi", "1,2"], "did you mean --grid?"),
    ],
)
def test_a_mistyped_option_is_named_with_the_closest_one(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", str(tmp_path / "x.json")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["rnu", "--out", "x.json"], "invalid choice: 'rnu'"),
        (["run", "--strategy", "ewcc"], "unknown strategy 'ewcc' (did you mean 'ewc'?)"),
        (["run", "--benchmark", "split-mnsit"], "(did you mean 'split-mnist'?)"),
        (["compare", "--strategies", "naive,onlin-ewc"], "(did you mean 'online-ewc'?)"),
        (["run", "--scenario", "clas"], "(did you mean 'class'?)"),
    ],
)
def test_a_mistyped_value_is_named_with_the_closest_choice(argv, message, capsys, tmp_path):
    out = [] if "--out" in argv else ["--out", str(tmp_path / "out.json")]
    try:
        code = main([*argv, *out])
    except SystemExit as e:  # argparse's own errors (the command)
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    if argv[0] == "rnu":
        assert "(did you mean 'run'?)" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["compare", "--seed", "0,1"],
            "--seed takes one value, got '0,1'; for several: --seeds 0,1",
        ),
        (["run", "--seed", "0,1"], "for several: ewc compare --seeds 0,1"),
        (["run", "--strategy", "naive,ewc"], "for several: ewc compare --strategies naive,ewc"),
        (["compare", "--lam", "1,10"], "for several: ewc sweep --grid 1,10"),
        (["sweep", "--grid", "1", "--lam", "1,10"], "for several: --grid 1,10"),
    ],
)
def test_a_list_for_a_single_value_names_the_option_for_several(argv, message, capsys, tmp_path):
    out = tmp_path / ("x.json" if argv[0] == "run" else "out")
    assert main([*argv, *FAST, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "argv",
    [
        ["compare", "--seed", "0,1"],
        ["compare", "--strategies", "ewcc"],
        ["compare", "--seeds", "0,0"],
        ["compare", "--lam", "-1"],
        ["compare", "--strategies", "naive", "--lr", "0"],
        ["run", "--strategy", "ewc", "--gamma", "2"],
        ["demo", "--data-dir", "nowhere", "--no-download", "--fast"],
        ["sweep", "--grid", "1,1"],
        ["sweep", "--grid", "1,x"],
    ],
    ids=" ".join,
)
def test_a_refused_command_creates_nothing(argv, tmp_path, monkeypatch, capsys):
    """Every check comes before the first folder: no empty ``--out`` or ``--log-dir`` left."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EWC_CACHE_DIR", str(tmp_path / "cache"))
    if argv[0] == "demo":  # a demo's bad input: an output folder that is a file
        (tmp_path / "file").write_text("")
        argv = [*argv, "--out", "file/out"]
    else:
        out = "out/x.json" if argv[0] == "run" else "out"
        argv = [*argv, "--benchmark", "split-digits", "--quiet", "--out", out]
    logs = [] if argv[0] == "sweep" else ["--log-dir", "logs"]
    assert main([*argv, *logs]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "note:" not in err  # refused before any note on the data
    assert sorted(p.name for p in tmp_path.iterdir()) == (["file"] if argv[0] == "demo" else [])


def test_unknown_config_key_exit_2(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lamda: 3\n")
    assert main(["run", "--config", str(cfg), "--out", str(tmp_path / "x.json")]) == 2
    assert "unknown config key(s) 'lamda'" in capsys.readouterr().err


@pytest.mark.parametrize("corrupt", [False, True])
def test_wrong_data_dir_exit_2(corrupt, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("EWC_DATA_DIR", raising=False)
    monkeypatch.setenv("EWC_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "data"
    data.mkdir()
    if corrupt:  # a file with the right name and the wrong content
        for name in (
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        ):
            (data / name).write_bytes(b"\x00\x00\x08\x01" + b"\x00" * 12)
    argv = [
        "run",
        "--benchmark",
        "split-mnist",
        "--data-dir",
        str(data),
        "--no-download",
        "--strategy",
        "naive",
        "--out",
        str(tmp_path / "x.json"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(data) in err and "Traceback" not in err
    if corrupt:  # one file is bad: one line that names it
        assert len(err.strip().splitlines()) == 1
        assert ".;" not in err and ":;" not in err  # sentences run on; only list items get "; "
    else:  # every place looked, the way to supply the files and the offline benchmarks
        lines = err.strip().splitlines()
        assert lines[0].startswith("ewc run: error: Could not find the mnist files")
        assert str(tmp_path / "cache" / "mnist") in err and "split-digits" in err
        assert max(map(len, lines)) < 250  # not one 900-character line


def test_demo_eta_prices_the_seed_experiment_on_this_machine():
    """The demo's ETA, from one timed step of its model: positive, and six times the training
    samples (the full demo against --fast) cost more."""
    base = RunConfig(benchmark="fashion-mnist-to-mnist")
    fast = _demo_eta(base, 10000)
    assert 0 < fast < _demo_eta(base, 60000)


def test_demo_falls_back_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("EWC_DATA_DIR", str(tmp_path / "empty"))
    monkeypatch.setenv("EWC_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--no-download", "--quiet", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "Missing data: fashion-mnist and mnist" in captured.err  # both named at once
    reason = (
        "the fashion-mnist and mnist files were not found and downloads are off (--no-download)"
    )
    stand_in = "STAND-IN: permuted-digits (scikit-learn's digits, 2 tasks, shared head) instead of"
    assert f"{stand_in} fashion-mnist-to-mnist, because {reason}." in captured.err
    assert captured.err.strip().splitlines()[-1].endswith("The results and the report say so too.")
    printed = captured.out.strip().splitlines()
    assert printed[-1] == f"report: {out / 'report.html'}"
    assert printed[-2].startswith("ewc (λ = 10000) kept permuted-1 at ")  # the result in words
    assert " without it (naive fine-tuning), " in printed[-2]
    for strategy in ("naive", "ewc"):
        config = json.loads((out / f"{strategy}-seed0.json").read_text())["config"]
        assert config["extra"]["stand_in"] == {"for": "fashion-mnist-to-mnist", "reason": reason}
    report = (out / "report.md").read_text()
    assert report.startswith("# Continual learning report — stand-in for fashion-mnist-to-mnist")


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")), ids=lambda p: p.name
)
def test_published_protocol_configs_are_valid(path):
    from ewc.config import read_config_file
    from ewc.runner import RunConfig, resolve_config

    cfg = resolve_config(RunConfig.from_dict(read_config_file(path)))
    assert cfg.benchmark in (
        "fashion-mnist-to-mnist",
        "split-mnist",
        "permuted-mnist",
        "permuted-mnist-32",
    )


def test_a_warning_is_one_line_naming_the_file(tmp_path, capsys):
    """A damaged checkpoint is ignored with one line on stderr (no Python source line)."""
    (tmp_path / "r.ckpt.pt").write_bytes(b"garbage")
    run = ["run", "--strategy", "naive", "--tasks", "2", "--max-train-samples", "40", "--quiet"]
    code = main([*run, "--epochs", "1", "--out", str(tmp_path / "r.json"), "--no-report"])
    assert code == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line]
    warned = [line for line in err if "r.ckpt.pt" in line]
    assert len(warned) == 1 and warned[0].startswith("ewc: warning: ignoring checkpoint")
    assert not any("warnings.warn" in line or line.startswith(" ") for line in err)
