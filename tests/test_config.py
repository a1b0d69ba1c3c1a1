"""The validation layer: every run setting coerced or refused, whichever way it arrives."""

import contextlib
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ewc.config import ConfigError, read_config_file
from ewc.runner import RunConfig, resolve_config


@pytest.mark.parametrize(
    "values, field, expected",
    [
        ({"lam": "1e4"}, "lam", 1e4),
        ({"lam": 100}, "lam", 100.0),
        ({"n_tasks": 3.0}, "n_tasks", 3),
        ({"n_tasks": "3"}, "n_tasks", 3),
        ({"hidden": 50}, "hidden", (50,)),
        ({"hidden": "400,400"}, "hidden", (400, 400)),
        ({"hidden": [32, 16.0]}, "hidden", (32, 16)),
        ({"download": "false"}, "download", False),
    ],
)
def test_lossless_values_are_coerced(values, field, expected):
    value = getattr(RunConfig(**values), field)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"seed": "abc"}, "seed: expected an integer, got 'abc'"),
        ({"batch_size": True}, "batch_size: expected an integer, got True"),
        ({"n_tasks": 2.5}, "n_tasks: expected an integer, got 2.5"),
        ({"benchmark": ["x"]}, "benchmark: expected a string, got ['x']"),
        ({"download": "yes"}, "download: expected true or false, got 'yes'"),
        ({"hidden": {"a": 1}}, "hidden: expected a list of integers"),
        ({"hidden": [0]}, "hidden: expected an integer >= 1"),
        ({"lam": 1e39}, "lam: expected a finite number >= 0 and <= 3.4"),
        ({"lam": math.inf}, "lam: expected a finite number"),
        ({"lr": 0}, "lr: expected a finite number > 0, got 0.0"),
        ({"gamma": 1.5}, "gamma: expected a finite number > 0 and <= 1"),
        ({"seed": -1}, "seed: expected an integer >= 0"),
        ({"val_fraction": 1.0}, "val_fraction: expected a finite number >= 0 and < 1"),
        ({"lr": 10**400}, "lr: expected a number"),
        ({"extra": [1]}, "extra: expected a mapping"),
    ],
)
def test_bad_types_and_ranges_are_refused_with_key_and_value(values, message):
    with pytest.raises(ConfigError, match="^" + message.replace("[", r"\[").replace("(", r"\(")):
        RunConfig(**values)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"device": "tpu"}, "device: expected 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
        ({"device": "cuda:99"}, "device: 'cuda:99'"),
        ({"epochs": 1, "iterations": 5}, "epochs=1 and iterations=5 both set"),
        ({"strategy": "naive", "lam": 3}, "lam=3.0 is read only by ewc"),
        ({"strategy": "ewc", "gamma": 0.5}, "gamma=0.5 is read only by online-ewc.*, not by ewc"),
        ({"strategy": "naive", "penalty": "autograd"}, "penalty='autograd' is read only by ewc"),
        ({"strategy": "l2", "fisher": "sampled"}, "fisher='sampled' is read only by"),
        ({"scenario": "cls"}, "unknown scenario for split-digits 'cls'"),
        ({"n_tasks": 9}, "n_tasks: split-digits has at most 5 tasks, got 9"),
    ],
)
def test_contradictions_and_ignored_settings_are_refused(values, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        resolve_config(RunConfig(**values))


def test_resolve_is_idempotent_for_protocol_defaults():
    """A resolved config (the protocol's fisher_samples filled in for naive) resolves again."""
    cfg = resolve_config(RunConfig(benchmark="fashion-mnist-to-mnist", strategy="naive"))
    assert resolve_config(cfg) == cfg


def test_yaml_reads_1_2_numbers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lam: 1e4\nlr: 1e-3\nhidden: [32]\nbenchmark: split-digits\n")
    cfg = RunConfig.from_dict(read_config_file(path))
    assert (cfg.lam, cfg.lr, cfg.hidden) == (1e4, 1e-3, (32,))


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("c.yaml", "lam: 1\nlam: 2\n", 'duplicate key "lam"'),
        ("c.toml", "lam = 1\nlam = 2\n", "does not parse"),
        ("c.yaml", "lam: [1\n", "does not parse"),
        ("c.yaml", "- 1\n", "must hold a mapping"),
        ("c.yaml", "[" * 5000, "nested too deeply"),
        ("c.yaml", "x: !!python/object/apply:os.system [ls]\n", "does not parse"),
    ],
)
def test_bad_config_files_are_refused(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        read_config_file(path)


def test_config_file_not_utf8_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"lam: \xff\xfe\n")
    with pytest.raises(ConfigError, match="cannot read config file"):
        read_config_file(path)


_FIELDS = [
    "benchmark",
    "strategy",
    "scenario",
    "n_tasks",
    "hidden",
    "epochs",
    "iterations",
    "batch_size",
    "lr",
    "lam",
    "gamma",
    "xi",
    "fisher",
    "seed",
    "device",
    "download",
    "val_fraction",
    "evaluate_on",
    "penalty",
    "lamda",
]
_YAML_VALUES = st.one_of(
    st.sampled_from(
        [
            "1e4",
            "-1",
            "0",
            "2.5",
            ".inf",
            ".nan",
            "1e39",
            "true",
            "yes",
            "null",
            "abc",
            "[1, 2]",
            "[x]",
            "{a: 1}",
            "0x10",
            "'1e-3'",
            "[[[]]]",
            "cuda",
            "task",
            "ewc",
            "9" * 30,
        ]
    ),
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=12),
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.dictionaries(st.sampled_from(_FIELDS), _YAML_VALUES, max_size=5), st.booleans())
def test_any_config_file_is_accepted_or_refused_with_config_error(tmp_path_factory, lines, toml):
    """Whatever a config file holds, reading and checking it gives a resolved config or a
    ConfigError; never another exception."""
    if toml:
        text = "".join(f"{k} = {v}\n" for k, v in lines.items())
    else:
        text = "".join(f"{k}: {v}\n" for k, v in lines.items())
    path = tmp_path_factory.mktemp("cfg") / ("c.toml" if toml else "c.yaml")
    path.write_text(text, encoding="utf-8")
    with contextlib.suppress(ConfigError):
        resolve_config(RunConfig.from_dict(read_config_file(path)))


def test_parallel_is_checked_up_front() -> None:
    """``parallel``: ddp or fsdp; K-FAC cannot shard, and says which strategy can."""
    with pytest.raises(ConfigError, match="unknown parallel 'zero'"):
        resolve_config(RunConfig(parallel="zero"))
    with pytest.raises(ConfigError, match=r"kfac.*parallel='fsdp'.*strategy 'ewc'"):
        resolve_config(RunConfig(strategy="kfac", parallel="fsdp"))
    assert resolve_config(RunConfig(parallel="fsdp")).parallel == "fsdp"


def test_a_data_dir_that_is_not_a_folder_is_refused_up_front(tmp_path) -> None:
    """An explicit --data-dir that does not exist is named, not silently replaced by the cache
    or $EWC_DATA_DIR; the offline digits benchmarks read no files and ignore it."""
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=r"data_dir '.*nowhere' is not a folder"):
        resolve_config(RunConfig(benchmark="split-mnist", strategy="naive", data_dir=missing))
    assert resolve_config(RunConfig(benchmark="split-digits", data_dir=missing)).data_dir == missing
