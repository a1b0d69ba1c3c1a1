"""Reliability: every file read back is checked, every output is ours alone, a run that diverged
says so. Property-based tests mutate real checkpoints and results files (no traceback, no silent
acceptance); one test per kind of defect of issue 22."""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import pickle
import socket
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import ewc
from ewc import checkpoint
from ewc.cli import main
from ewc.data.streams import stream_from_tensors
from ewc.integrations import read_state
from ewc.metrics import compute_metrics
from ewc.outputs import LOCK_NAME, check_paths, hold
from ewc.readback import DamagedFileError
from ewc.regularizers import EWC, KFAC, L2, MAS, SI, OnlineEWC
from ewc.results import OutputError, ResultsError, load_results
from ewc.runner import DivergedError, RunConfig, run, sweep
from ewc.runner.run import _Run

TINY = dict(benchmark="split-digits", hidden=(16,), max_train_samples=60, epochs=2.0)
RESULTS = Path(__file__).parent / "data" / "report" / "naive-seed0.json"
SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class _Killed(Exception):
    pass


def _stop_after(task: int):
    def on_task_end(t: int, accuracies: list[float]) -> None:
        if t == task:
            raise _Killed

    return on_task_end


@functools.cache
def _checkpoint_bytes(strategy: str) -> bytes:
    """A real checkpoint after two tasks of a tiny run."""
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"ewc-test-{os.getpid()}-{strategy}.ckpt.pt"
    with pytest.raises(_Killed):
        run(RunConfig(strategy=strategy, **TINY), checkpoint=path, on_task_end=_stop_after(1))
    data = path.read_bytes()
    path.unlink()
    return data


@functools.cache
def _fresh_run(strategy: str) -> _Run:
    """A run as the runner builds it before resuming (model, optimizer, regularizer)."""
    cfg = ewc.runner.resolve_config(RunConfig(strategy=strategy, **TINY))
    return _Run(cfg, None, None, False, None)


def _assert_ignored(path: Path, strategy: str) -> None:
    """Resuming from ``path`` warns naming it and restores nothing: the run starts over."""
    state = _fresh_run(strategy)
    before = copy.deepcopy(state.model.state_dict())
    rng = state.generator.get_state()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = state.resume(path)
    assert first == 0
    assert any(str(path) in str(w.message) and "ignoring" in str(w.message) for w in caught)
    assert all("weights_only=False" not in str(w.message) for w in caught)
    after = state.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(rng, state.generator.get_state())


# ---------------------------------------------------------------- 1. checkpoints


def test_a_real_checkpoint_is_accepted_whole(tmp_path):
    path = tmp_path / "r.ckpt.pt"
    path.write_bytes(_checkpoint_bytes("ewc"))
    assert _fresh_run("ewc").resume(path) == 2
    _fresh_run.cache_clear()


@SETTINGS
@given(data=st.data())
def test_damaged_checkpoint_bytes_are_ignored_with_a_warning(tmp_path, data):
    raw = bytearray(_checkpoint_bytes("ewc"))
    kind = data.draw(st.sampled_from(["flip", "truncate", "append"]))
    if kind == "flip":
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    else:
        raw += data.draw(st.binary(min_size=1, max_size=16))
    path = tmp_path / "r.ckpt.pt"
    path.write_bytes(bytes(raw))
    _assert_ignored(path, "ewc")


def _leaves(tree: Any, where: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """The paths to every leaf (tensor, number, string, None) of a state, lists and dicts
    walked; a leaf is a path of keys and indices."""
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in _leaves(v, (*where, k))]
    if isinstance(tree, list | tuple):
        return [p for i, v in enumerate(tree) for p in _leaves(v, (*where, i))]
    return [where]


def _set(tree: Any, where: tuple[Any, ...], value: Any) -> Any:
    if not where:
        return value
    key, rest = where[0], where[1:]
    if isinstance(tree, tuple):
        return tuple(_set(v, rest, value) if i == key else v for i, v in enumerate(tree))
    tree[key] = _set(tree[key], rest, value)
    return tree


@SETTINGS
@given(data=st.data(), strategy=st.sampled_from(["ewc", "si", "kfac"]))
def test_checkpoints_edited_inside_and_rehashed_are_ignored_with_a_warning(
    tmp_path, data, strategy
):
    """Edits that keep the hash valid (the file rewritten by ewc's writer): a leaf of another
    type, a tensor of another shape or with a NaN, a required key dropped."""
    state = checkpoint.read(_write(tmp_path, _checkpoint_bytes(strategy)))
    del state["schema"]
    leaves = [p for p in _leaves(state) if p[0] != "config"]
    where = data.draw(st.sampled_from(leaves))
    value = _get(state, where)
    kinds = ["type", "drop"]
    if isinstance(value, torch.Tensor) and value.numel() > 0:
        kinds += ["shape"] + (["nan"] if value.is_floating_point() else [])
    kind = data.draw(st.sampled_from(kinds))
    if kind == "type":
        _set(state, where, "edited")
    elif kind == "shape":
        _set(state, where, value.reshape(-1)[:-1].clone() if value.numel() > 1 else value[None])
    elif kind == "nan":
        edited = value.clone()
        edited.reshape(-1)[0] = math.nan
        _set(state, where, edited)
    else:
        parent = _get(state, where[:-1])
        if isinstance(parent, tuple):  # tuples (Adam's betas) cannot lose an item: retype
            _set(state, where, "edited")
        else:
            del parent[where[-1]]
    path = tmp_path / "edited.ckpt.pt"
    checkpoint.write(path, state)
    _assert_ignored(path, strategy)


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "r.ckpt.pt"
    path.write_bytes(data)
    return path


def _get(tree: Any, where: tuple[Any, ...]) -> Any:
    for key in where:
        tree = tree[key]
    return tree


@pytest.mark.parametrize(
    "edit",
    [
        lambda s: s.update(tasks_done=7),
        lambda s: s.update(tasks_done="2"),
        lambda s: s["partial"].update(step=s["partial"]["step"] + 1),
        lambda s: s["partial"]["matrix"][0].__setitem__(0, 1.5),
        lambda s: s["optimizer"].update(param_groups=[]),
        lambda s: s["optimizer"]["param_groups"][0].update(lr=1.0),
        lambda s: s["regularizer"].update(lam=1.0),
        lambda s: s["regularizer"].update(type="SI"),
        lambda s: s["regularizer"]["importance"].update(
            {k: -v - 1 for k, v in s["regularizer"]["importance"].items()}
        ),
        lambda s: s.update(generator=torch.zeros(3, dtype=torch.uint8)),
        lambda s: s["model"].update({k: v * math.nan for k, v in s["model"].items()}),
    ],
)
def test_checkpoint_values_are_checked_against_the_run(tmp_path, edit):
    state = checkpoint.read(_write(tmp_path, _checkpoint_bytes("ewc")))
    edit(state)
    path = tmp_path / "edited.ckpt.pt"
    checkpoint.write(path, state)
    _assert_ignored(path, "ewc")


def test_a_pickle_as_checkpoint_is_ignored_without_weights_only_advice(tmp_path):
    path = tmp_path / "r.ckpt.pt"
    payload = pickle.dumps(_Killed())
    path.write_bytes(b"ewc.checkpoint/2 sha256=" + _sha(payload) + b"\n" + payload)
    _assert_ignored(path, "ewc")


def _sha(data: bytes) -> bytes:
    import hashlib

    return hashlib.sha256(data).hexdigest().encode()


# ---------------------------------------------------------------- 2. results files


def _results_text() -> str:
    return RESULTS.read_text(encoding="utf-8")


@SETTINGS
@given(data=st.data())
def test_mutated_results_files_are_refused_or_read_never_a_traceback(tmp_path, data):
    raw = bytearray(_results_text().encode())
    kind = data.draw(st.sampled_from(["flip", "truncate"]))
    if kind == "flip":
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    else:
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    path = tmp_path / "r.json"
    path.write_bytes(bytes(raw))
    try:
        load_results(path)
    except ResultsError as e:
        assert str(path) in str(e)


@SETTINGS
@given(data=st.data())
def test_results_with_a_key_dropped_or_retyped_or_a_metric_edited_are_refused(tmp_path, data):
    doc = json.loads(_results_text())
    required = [
        p for p in _leaves(doc) if p[0] in ("accuracy_matrix", "metrics", "random_init_accuracy")
    ]
    where = data.draw(st.sampled_from(required))
    kind = data.draw(st.sampled_from(["drop", "type", "metric"]))
    if kind == "drop":
        del _get(doc, where[:-1])[where[-1]]
    elif kind == "type":
        _set(doc, where, "edited")
    else:
        name = data.draw(st.sampled_from(["acc", "bwt", "fwt", "forgetting"]))
        delta = data.draw(st.sampled_from([-0.01, 0.001, 0.2]))
        doc["metrics"][name] = min(max(doc["metrics"][name] + delta, -1.0), 1.0)
        if doc["metrics"][name] == json.loads(_results_text())["metrics"][name]:
            doc["metrics"][name] -= 0.0001
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ResultsError, match=r"r\.json"):
        load_results(path)


def test_a_duplicate_key_is_refused(tmp_path):
    text = _results_text().replace('"strategy": "naive"', '"strategy": "naive", "strategy": "ewc"')
    assert text != _results_text()
    path = tmp_path / "r.json"
    path.write_text(text)
    with pytest.raises(ResultsError, match="key 'strategy' appears twice"):
        load_results(path)


def test_metrics_disagreeing_with_the_matrix_are_refused_by_name(tmp_path):
    doc = json.loads(_results_text())
    doc["metrics"]["acc"] = 0.99
    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ResultsError, match=r"'metrics\.acc' is 0\.99 but the accuracy matrix"):
        load_results(path)
    assert compute_metrics(doc["accuracy_matrix"], doc["random_init_accuracy"])["acc"] != 0.99


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(chosen=5.0), "'chosen' 5.0 is not one of the points"),
        (dict(chosen=1.0), "not the finished point of highest"),
        (dict(grid=[1.0, 3.0]), "not at the 'grid'"),
        (dict(points=[]), "'points' is empty"),
    ],
)
def test_sweep_files_are_checked_for_consistency(tmp_path, change, message):
    sweep_doc = {
        "schema": "ewc.sweep/1",
        "grid": [1.0, 2.0],
        "points": [
            {"value": 1.0, "val_acc": 0.5, "val_old_acc": 0.5, "val_new_acc": 0.5},
            {"value": 2.0, "val_acc": 0.7, "val_old_acc": 0.7, "val_new_acc": 0.7},
        ],
        "chosen": 2.0,
    }
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(sweep_doc))
    load_results(path)
    path.write_text(json.dumps({**sweep_doc, **change}))
    with pytest.raises(ResultsError, match=message):
        load_results(path)


# ---------------------------------------------------------------- 3. divergence


def test_a_run_that_diverges_without_nan_stops_with_the_lr_lam_advice():
    cfg = RunConfig(strategy="naive", lr=1e6, **TINY)
    with pytest.raises(DivergedError, match=r"blew up.*\(lr\) or the penalty \(lam\)"):
        run(cfg)


def test_divergence_is_read_from_the_loss_and_from_the_weights():
    from ewc.runner.task import Divergence

    model = nn.Linear(4, 10)
    check = Divergence(model, n_classes=10)
    check.check_loss(50 * math.log(10), "a", 5)  # a bad start in class-incremental learning
    check.check_loss(None, "a", 5)
    for loss in (101 * math.log(10), math.inf, math.nan):
        with pytest.raises(DivergedError, match="loss exploded while training task 'a'"):
            check.check_loss(loss, "a", 5)
    check.check_weights("a")
    with torch.no_grad():
        model.weight.mul_(2e4 / float(model.weight.abs().max()))
    with pytest.raises(DivergedError, match=r"blew up \(over 10000 x .* in weight\)"):
        check.check_weights("a")
    with torch.no_grad():
        model.weight.zero_()
        model.bias[0] = math.nan
    with pytest.raises(DivergedError, match=r"NaN or infinite \(in bias\)"):
        check.check_weights("a")


def test_a_sweep_says_which_points_diverged(tmp_path, capsys):
    cfg = RunConfig(strategy="naive", **TINY)
    summary = sweep(cfg, [1e6, 1e-3], tmp_path, param="lr")
    assert summary["points"][0]["diverged"] and "diverged" not in summary["points"][1]
    assert summary["chosen"] == 1e-3
    argv = ["sweep", "--benchmark=split-digits", "--hidden=16", "--max-train-samples=60"]
    argv += ["--epochs=2", "--strategy=naive", "--param=lr", "--grid=1e6,1e-3", "--quiet"]
    assert main([*argv, "--no-report", f"--out={tmp_path / 'cli'}"]) == 0
    assert "1 of 2 points diverged (lr=1e+06)" in capsys.readouterr().out


def test_divergence_checks_add_no_synchronisation_per_step(monkeypatch):
    """The checks read only values the curve points synchronise anyway: one loss check per
    curve point, never per step."""
    from ewc.runner import task

    calls = []
    check = task.Divergence.check_loss
    monkeypatch.setattr(
        task.Divergence, "check_loss", lambda self, *a: calls.append(a) or check(self, *a)
    )
    result = run(RunConfig(strategy="naive", **TINY))
    assert len(calls) == len(result["curves"]["step"])


# ---------------------------------------------------------------- 4. empty lists


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--hidden", ""], "hidden: expected comma-separated integers"),
        (["run", "--hidden", ",,"], "hidden: expected comma-separated integers"),
        (["compare", "--strategies", ""], "--strategies is empty"),
        (["compare", "--seeds", " , "], "--seeds is empty"),
        (["run", "--log-dir", ""], "--log-dir: expected a path"),
    ],
)
def test_empty_lists_and_paths_are_refused_by_name(tmp_path, capsys, argv, message):
    out = tmp_path / ("r.json" if argv[0] == "run" else "out")
    try:
        code = main([*argv, "--benchmark=split-digits", f"--out={out}"])
    except SystemExit as e:
        code = e.code
    assert code == 2 and message in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------- 5. lost work


def test_every_output_is_checked_before_any_work(tmp_path, capsys):
    base = ["run", "--benchmark=split-digits", "--quiet"]
    out = tmp_path / "r.json"
    assert main([*base, f"--out={out}", f"--log-dir={out}"]) == 2
    assert "would be written twice" in capsys.readouterr().err
    (tmp_path / "r.ckpt.pt").mkdir()
    assert main([*base, f"--out={out}"]) == 2
    assert "r.ckpt.pt' is a folder" in capsys.readouterr().err
    assert not out.exists()


def test_check_paths_refuses_an_output_under_an_output_file(tmp_path):
    with pytest.raises(OutputError, match="lies under"):
        check_paths([tmp_path / "a.json"], [tmp_path / "a.json" / "logs"])
    assert not (tmp_path / "a.json").exists()


def test_a_second_command_on_the_same_output_refuses_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "out"
    with hold(out):
        argv = ["compare", "--benchmark=split-digits", "--quiet", f"--out={out}"]
        assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"pid {os.getpid()} on {socket.gethostname()}" in err and str(out) in err
    assert not (out / LOCK_NAME).exists()  # released


def test_a_dead_commands_lock_is_taken_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = {"pid": 2**22 + 12345, "host": socket.gethostname(), "command": "ewc compare"}
    (out / LOCK_NAME).write_text(json.dumps(dead))
    with hold(out) as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()


# ---------------------------------------------------------------- 6. library misuse

MLP = functools.partial(nn.Sequential, nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.mark.parametrize("cls", [EWC, OnlineEWC, MAS, KFAC])
def test_consolidate_names_the_batch_the_model_failed_on(cls):
    good = (torch.randn(5, 4), torch.randint(0, 3, (5,)))
    bad = (torch.randn(5, 6), torch.randint(0, 3, (5,)))
    with pytest.raises(
        ValueError, match=r"batch 2: the model failed on a batch of shape\(s\) \[5, 6\]"
    ):
        cls(MLP(), lam=1.0).consolidate([good, good, bad])


@pytest.mark.parametrize("cls", [EWC, OnlineEWC, MAS, KFAC, SI, L2])
@pytest.mark.parametrize("model", ["mlp", None])
def test_a_regularizer_on_something_else_than_a_module_is_refused(cls, model):
    with pytest.raises(ValueError, match=f"{cls.__name__} needs the model"):
        cls(model, lam=1.0)


@pytest.mark.parametrize("cls", [EWC, KFAC, SI])
def test_lam_beyond_float32_is_refused_in_the_library_too(cls):
    with pytest.raises(ValueError, match=r"lam must be <= 3\.40282347e"):
        cls(MLP(), lam=1e39)


def _stream(nan: bool = False, empty_first: bool = False):
    g = torch.Generator().manual_seed(0)

    def task() -> tuple[torch.Tensor, ...]:
        x, y = torch.randn(40, 6, generator=g), torch.randint(0, 2, (40,), generator=g)
        return x, y, x.clone(), y.clone()

    first = task()
    if nan:
        first[0][3, 2] = math.nan
    if empty_first:
        first = (first[0][:0], first[1][:0], first[2], first[3])
    return stream_from_tensors([first, task()], scenario="domain")


@pytest.mark.parametrize(
    "model, message",
    [
        (nn.Linear(5, 2), r"inputs of shape \[2, 6\].*mat1 and mat2"),
        (nn.Linear(6, 1), r"to \[2, 1\]; the runner needs \[B, 2\] logits"),
        (nn.Sequential(), "has no trainable parameters"),
    ],
)
def test_run_checks_the_model_before_training(model, message, monkeypatch):
    from ewc.runner import task

    monkeypatch.setattr(task.TrainStep, "__call__", lambda *a: pytest.fail("trained"))
    with pytest.raises(ValueError, match=message):
        run(RunConfig(strategy="ewc", epochs=1.0), stream=_stream(), model=model)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(stream=[1, 2]), "stream should be a TaskStream"),
        (dict(model="mlp"), "model should be a torch.nn.Module"),
        (dict(config={"strategy": "ewc"}), "config should be ewc.RunConfig"),
    ],
)
def test_run_names_an_argument_of_the_wrong_type(kwargs, message):
    config = kwargs.pop("config", RunConfig(strategy="ewc", **TINY))
    with pytest.raises(ValueError, match=message):
        run(config, **kwargs)


def test_run_checks_its_checkpoint_path_before_training(tmp_path):
    with pytest.raises(OutputError, match="is a folder"):
        run(RunConfig(strategy="ewc", **TINY), checkpoint=tmp_path)


def test_run_names_an_empty_training_task_before_training():
    with pytest.raises(ValueError, match="task 'task-1' has no training samples"):
        run(RunConfig(strategy="ewc", epochs=1.0), stream=_stream(empty_first=True))


def test_streams_refuse_nan_inputs_by_task():
    with pytest.raises(ValueError, match="Task 'task-1': its train inputs hold 1 NaN"):
        _stream(nan=True)


def test_compute_metrics_refuses_a_ragged_matrix():
    with pytest.raises(ValueError, match=r"its rows have \[1, 2\] entries"):
        compute_metrics([[0.5], [0.5, 0.6]], [0.1, 0.1])


def test_consolidate_warns_about_all_ignored_labels_and_frozen_parameters():
    model = MLP()
    x = torch.randn(20, 4)
    with pytest.warns(UserWarning, match="importance is zero for every parameter"):
        EWC(model, lam=1.0).consolidate([(x, torch.full((20,), -100))])
    reg = EWC(model, lam=1.0)
    model[0].weight.requires_grad_(False)
    with pytest.warns(UserWarning, match=r"\['0.weight'\] were frozen after the regularizer"):
        reg.consolidate([(x, torch.randint(0, 3, (20,)))])


# ---------------------------------------------------------------- 7. callback state


@pytest.mark.parametrize(
    "content, message",
    [
        (b"PK\x03\x04truncated", "truncated or damaged"),
        (pickle.dumps(_Killed()), "holds objects other than tensors"),
        (None, "should be a regularizer state"),
    ],
)
def test_a_damaged_callback_state_is_one_line_saying_to_delete_it(tmp_path, content, message):
    path = tmp_path / "ewc_callback.pt"
    if content is None:
        torch.save([1, 2], path)
    else:
        path.write_bytes(content)
    with pytest.raises(DamagedFileError, match=message) as caught:
        read_state(path)
    text = str(caught.value)
    assert str(path) in text and "delete" in text and "weights_only=False" not in text
    assert "\n" not in text


def test_a_saved_regularizer_state_is_read_back_checked(tmp_path):
    from ewc.readback import read_regularizer_state

    model, path = MLP(), tmp_path / "ewc.pt"
    reg = EWC(model, lam=1.0)
    reg.consolidate([(torch.randn(8, 4), torch.randint(0, 3, (8,)))])
    torch.save(reg.state_dict(), path)
    other = EWC(model, lam=1.0)
    read_regularizer_state(path, other)
    assert other.n_tasks == 1
    torch.save(reg.state_dict(), path)
    with pytest.raises(
        DamagedFileError, match=r"ewc\.pt' cannot be loaded: .*saved by EWC, not SI"
    ):
        read_regularizer_state(path, SI(model, lam=1.0))
    path.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(DamagedFileError, match="truncated or damaged"):
        read_regularizer_state(path, other)


def test_a_bad_callback_state_given_to_the_callback_names_it():
    from ewc.integrations._continual import Continual

    continual = Continual(1.0, "ewc", None, {})
    state = EWC(MLP(), lam=1.0).state_dict()
    state["importance"] = {k: -v - 1 for k, v in state["importance"].items()}
    with pytest.raises(DamagedFileError, match=r"the ewc state in here cannot be used.*delete"):
        continual.restore(MLP(), state, "here")


@pytest.mark.parametrize("given", [torch.ones(3), [1, 2], "state"])
def test_a_callback_state_of_the_wrong_type_is_refused_when_training_starts(given):
    from ewc.integrations._continual import Continual, pending

    with pytest.raises(DamagedFileError, match="must be a dict from state_dict"):
        Continual(1.0, "ewc", None, {}).restore(MLP(), pending(given), "the given state")
    assert pending({}) is None and pending(None) is None


def test_callback_data_without_batches_fails_when_training_starts():
    from ewc.integrations._continual import Continual

    continual = Continual(1.0, "ewc", None, {})
    with pytest.raises(ValueError, match="`data` holds no batches"):
        continual.check(MLP(), [], None)
