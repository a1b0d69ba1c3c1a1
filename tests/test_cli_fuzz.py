"""Fuzzing the command line: whatever the flags, a command either gets past every check to its
first run, or ends with exit code 2 and one line, before any work; never a traceback.

The first run is replaced by a stub that raises ``_Reached``, so no example trains anything.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from unittest import mock

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ewc.cli import _RUN_OPTIONS, main


class _Reached(Exception):
    """The command passed every check and asked for its first run."""


def _first_run(*args: object, **kwargs: object) -> None:
    raise _Reached


_NASTY = st.one_of(
    st.sampled_from(
        [
            "",
            "0",
            "-1",
            "1",
            "2.5",
            "1e39",
            "1e-400",
            "nan",
            "inf",
            "-inf",
            "true",
            "abc",
            "1,2",
            ",",
            "0,0",
            "naive,naive",
            "[x]",
            "0x10",
            "9" * 400,
            "cuda",
            "cuda:7",
            "tpu",
            "ewc",
            "lam",
            "seed",
            "hidden",
            "0.999",
            "<script>",
        ]
    ),
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=10),
)
_COMMAND_FLAGS = {
    "run": ["--strategy"],
    "compare": ["--strategies", "--seeds"],
    "sweep": ["--strategy", "--grid", "--param", "--val-fraction"],
}


@st.composite
def _argv(draw: st.DrawFn, folder: Path) -> list[str]:
    command = draw(st.sampled_from(sorted(_COMMAND_FLAGS)))
    flags = [*_RUN_OPTIONS, "--threads", *_COMMAND_FLAGS[command]]
    argv = [command, "--benchmark=split-digits", "--quiet", "--no-report"]
    for _ in range(draw(st.integers(1, 3))):
        argv.append(f"{draw(st.sampled_from(flags))}={draw(_NASTY)}")
    if command == "sweep" and not any(a.startswith("--grid=") for a in argv):
        argv.append("--grid=1,10")
    a_file = folder / "a-file"
    a_file.touch()
    out = draw(st.sampled_from([folder / "out", a_file, a_file / "under", folder]))
    if command == "run":
        out = out.with_suffix(".json") if out != folder else folder
    return [*argv, f"--out={out}"]


@settings(max_examples=200, deadline=None, derandomize=True)
@given(data=st.data())
def test_any_flags_reach_the_first_run_or_exit_2_with_one_line(tmp_path_factory, data):
    argv = data.draw(_argv(tmp_path_factory.mktemp("fuzz")))
    err = io.StringIO()
    threads = torch.get_num_threads()
    with (
        mock.patch("ewc.runner.experiments.run", _first_run),
        contextlib.redirect_stderr(err),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        try:
            code = main(argv)
        except _Reached:
            return
        except SystemExit as e:  # argparse
            code = e.code
        finally:
            torch.set_num_threads(threads)
    lines = err.getvalue().strip().splitlines()
    assert code == 2, (argv, err.getvalue())
    assert len(lines) == 1 and "error: " in lines[0], (argv, err.getvalue())
