"""Nothing hidden: ``--help`` says what every unset option takes, a command says what it runs
with, a stream of one's own says which protocol fills its unset settings, and the README's
own-data example runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import ewc
from ewc.cli import main
from ewc.data.streams import BENCHMARKS
from ewc.runner import describe_protocol

README = (Path(__file__).parents[1] / "README.md").read_text()


@pytest.mark.parametrize("command", ["run", "compare", "sweep"])
def test_help_shows_the_choices_and_the_value_each_option_takes(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    assert "(default: split-digits)" in text
    for name in BENCHMARKS:  # every benchmark named, with its protocol
        assert f"{name} {' '.join(describe_protocol(name).split())}" in text
    for default in ("(default: exact)", "(default: 0)", "(default: cpu)"):
        assert default in text
    assert text.count("(default: the benchmark's protocol, below)") >= 6  # epochs, lr, ...
    if command != "compare":
        assert "(default: ewc)" in text


def test_a_run_says_what_it_runs_with_and_which_choices_are_defaults(tmp_path, capsys):
    argv = ["run", "--epochs", "0.2", "--hidden", "16", "--quiet", "--no-report"]
    assert main([*argv, "--out", str(tmp_path / "r.json")]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(
        "run: ewc (default; --strategy chooses) on split-digits (default; --benchmark chooses): "
        "scenario task, model mlp, hidden 16, epochs 0.2, batch_size 32, lr 0.001, optimizer adam,"
        " lam 1000,"
    )
    assert (
        main(
            [
                *argv,
                "--strategy",
                "naive",
                "--benchmark",
                "split-digits",
                "--out",
                str(tmp_path / "n.json"),
            ]
        )
        == 0
    )
    assert capsys.readouterr().out.startswith("run: naive on split-digits: scenario task")


def _own_stream() -> ewc.data.streams.TaskStream:
    g = torch.Generator().manual_seed(0)
    tasks = []
    for shift in (0.0, 3.0):
        x = torch.randn(60, 5, generator=g) + shift
        y = (x[:, 0] > shift).long()
        tasks.append((x[:40], y[:40], x[40:], y[40:]))
    return ewc.stream_from_tensors(tasks, scenario="domain", name="toy")


def test_an_own_stream_takes_the_generic_protocol_and_says_so(capsys):
    model = torch.nn.Linear(5, 2)
    result = ewc.run(
        ewc.RunConfig(strategy="naive", iterations=3), stream=_own_stream(), model=model
    )
    assert result["benchmark"] == "toy" and result["config"]["benchmark"] is None
    assert (result["config"]["batch_size"], result["config"]["lr"]) == (128, 1e-3)
    note = capsys.readouterr().err
    assert note == (
        "note: your stream 'toy': settings left unset come from the generic protocol "
        "(benchmark=NAME takes that benchmark's instead): batch_size 128, lr 0.001, "
        "optimizer adam\n"
    )


def test_an_own_stream_takes_a_named_benchmarks_protocol_and_says_so(capsys):
    config = ewc.RunConfig(benchmark="split-digits", strategy="naive", iterations=3)
    result = ewc.run(config, stream=_own_stream(), model=torch.nn.Linear(5, 2))
    assert result["config"]["batch_size"] == 32
    assert "from the split-digits protocol: batch_size 32" in capsys.readouterr().err
    every = dict(iterations=3, batch_size=8, lr=0.01, optimizer="sgd")
    ewc.run(
        ewc.RunConfig(strategy="naive", **every), stream=_own_stream(), model=torch.nn.Linear(5, 2)
    )
    assert capsys.readouterr().err == ""  # nothing left unset: nothing to say


def test_the_readme_own_data_example_runs(tmp_path, monkeypatch, capsys):
    block = re.search(r"```python\n(import torch\nimport ewc\n.*?)```", README, re.S)
    assert block, "the README's own-data example is gone"
    monkeypatch.chdir(tmp_path)
    exec(compile(block.group(1), "README.md", "exec"), {})
    result = ewc.load_results(tmp_path / "runs" / "mine.json")
    assert len(result["accuracy_matrix"]) == 2 and result["benchmark"] == "mine"
    assert "note:" not in capsys.readouterr().err  # every setting named: nothing taken unseen
