"""Results files in and outputs out: malformed results refused with one line, outputs checked
before any work, runs that are not seeds of one experiment never averaged as such."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ewc.cli import main
from ewc.report import render_markdown
from ewc.results import (
    OutputError,
    ResultsError,
    check_comparable,
    check_output,
    load_results,
)

DATA = Path(__file__).parent / "data" / "report"
RUN = json.loads((DATA / "naive-seed0.json").read_text())


def _write(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _without(key: str) -> dict[str, Any]:
    run = copy.deepcopy(RUN)
    del run[key]
    return run


def _with(**changes: Any) -> dict[str, Any]:
    return {**copy.deepcopy(RUN), **changes}


@pytest.mark.parametrize(
    "data, message",
    [
        (_without("accuracy_matrix"), "key 'accuracy_matrix' is missing"),
        (_with(seed="0"), "'seed' should be an integer, not '0'"),
        (_with(seed=True), "'seed' should be an integer, not True"),
        (_with(task_names="abc"), "'task_names' should be a list"),
        (_with(accuracy_matrix=[[0.5]]), "'accuracy_matrix' should be 3 x 3 for 3 task names"),
        (_with(accuracy_matrix=[[0.5, 2.0, 0.5]] * 3), r"'accuracy_matrix\[0\]\[1\]' should be"),
        (_with(metrics={"acc": 0.5}), "key 'metrics.bwt' is missing"),
        (
            _with(curves={"step": [0], "task_boundaries": [0, 0, 0], "accuracy": []}),
            "'curves.accuracy'",
        ),
        ([1, 2], "not an ewc results file"),
        ({"schema": "ewc.sweep/1", "points": [{"value": 1}]}, r"'points\[0\]' has neither"),
    ],
)
def test_malformed_results_are_refused_naming_the_key(tmp_path, data, message):
    with pytest.raises(ResultsError, match=message):
        load_results(_write(tmp_path / "r.json", data))


@pytest.mark.parametrize(
    "text, message",
    [
        ("[" * 100000, "nested too deeply"),
        ('{"schema": NaN}', "not valid JSON"),
        ("{", "not valid JSON"),
    ],
)
def test_unparsable_results_are_refused(tmp_path, text, message):
    path = tmp_path / "r.json"
    path.write_text(text)
    with pytest.raises(ResultsError, match=message):
        load_results(path)


def test_a_folder_is_refused_as_results_file(tmp_path):
    with pytest.raises(ResultsError, match="cannot read results file"):
        load_results(tmp_path)


def test_check_output_refuses_folder_file_under_file_and_inputs(tmp_path):
    a_file = tmp_path / "a.json"
    a_file.write_text("{}")
    with pytest.raises(OutputError, match="is a folder; name a file"):
        check_output(tmp_path)
    with pytest.raises(OutputError, match="is a file; name a folder"):
        check_output(a_file, folder=True)
    with pytest.raises(OutputError, match="which is a file"):
        check_output(a_file / "sub" / "x.json")
    with pytest.raises(OutputError, match="is also an input"):
        check_output(tmp_path / "." / "a.json", inputs=[a_file])
    assert check_output(tmp_path / "new" / "x.json") == tmp_path / "new" / "x.json"
    assert not (tmp_path / "new").exists()  # checked, not created: a refused command leaves none


def test_same_seed_twice_is_refused():
    with pytest.raises(ResultsError, match="two naive runs with seed 0"):
        check_comparable([RUN, RUN])


def test_different_configs_are_not_averaged_as_seeds():
    other = _with(seed=1, config={**RUN["config"], "lr": 0.5, "seed": 1})
    with pytest.raises(ResultsError, match="naive runs differ in 'lr'"):
        check_comparable([RUN, other])
    check_comparable([RUN, _with(seed=1, config={**RUN["config"], "seed": 1})])


def test_markdown_escapes_markup_from_results():
    run = _with(task_names=["<script>alert(1)</script>", "b"], benchmark="<b>x</b>")
    md = render_markdown([run])
    assert "<script>" not in md and "<b>" not in md
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in md


@pytest.mark.parametrize("name", ["r.html", "r.md"])
def test_report_does_not_overwrite_its_input(tmp_path, capsys, name):
    path = _write(tmp_path / name, RUN)
    assert main(["report", str(path), "--out", str(tmp_path / "r.html")]) == 2
    assert "is also an input" in capsys.readouterr().err
    assert json.loads(path.read_text()) == RUN


# ------------------------------------------------------------------ fuzzing `ewc report`

_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**20), 10**20)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def _mutated_run(draw: st.DrawFn) -> dict[str, Any]:
    """The test run with one node deep in its tree replaced by random JSON, or deleted."""
    run = copy.deepcopy(RUN)
    node: Any = run
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        key = draw(st.sampled_from(keys))
        child = node[key]
        if not (isinstance(child, dict | list) and child) or draw(st.booleans()):
            break
        node = child
    if isinstance(node, dict) and draw(st.booleans()):
        del node[key]
    else:
        node[key] = draw(_JSON)
    return run


def _report_exit(path: Path, out: Path) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["report", str(path), "--out", str(out)])
    return code, err.getvalue()


@settings(
    max_examples=40,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(run=_mutated_run())
def test_report_on_any_mutated_results_exits_0_or_2_with_one_line(tmp_path_factory, run):
    folder = tmp_path_factory.mktemp("fuzz")
    code, err = _report_exit(_write(folder / "r.json", run), folder / "report.html")
    assert code in (0, 2)
    if code == 2:
        assert err.startswith("ewc report: error: ") and len(err.strip().splitlines()) == 1
