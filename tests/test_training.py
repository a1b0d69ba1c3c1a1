"""The sequential runner on the offline digits benchmarks (small settings, seeded)."""

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from ewc.config import ConfigError
from ewc.data.streams import stream_from_tensors
from ewc.results import load_results
from ewc.runner import (
    RunConfig,
    applicable_settings,
    compare,
    resolve_config,
    run,
    sweep,
)

FAST = dict(benchmark="split-digits", epochs=2.0, batch_size=32, hidden=(32,), eval_every=5)


def fast(**kw) -> RunConfig:
    return RunConfig(**{**FAST, **kw})


def test_results_schema_and_shapes():
    r = run(fast(strategy="ewc", scenario="task"))
    t = len(r["task_names"])
    assert t == 5 and r["scenario"] == "task"
    assert len(r["accuracy_matrix"]) == t and all(len(row) == t for row in r["accuracy_matrix"])
    assert all(0 <= a <= 1 for row in r["accuracy_matrix"] for a in row)
    assert set(r["metrics"]) == {"acc", "bwt", "fwt", "forgetting"}
    curves = r["curves"]
    assert len(curves["step"]) == len(curves["accuracy"])
    assert all(len(p) == t for p in curves["accuracy"])
    assert curves["task_boundaries"][0] == 0 and len(curves["task_boundaries"]) == t
    assert curves["step"] == sorted(curves["step"])
    assert len(r["importance"]) == t - 1  # nothing to consolidate after the last task
    assert r["importance"][0]["input_importance"]["shape"] == [8, 8]
    assert {"train_s", "fisher_s", "eval_s", "total_s"} <= set(r["timings"])
    json.dumps(r, allow_nan=False)  # serialisable as is


def test_results_record_the_hardware_they_ran_on():
    """CPU and GPU runs differ beyond rounding (TF32 convolutions on GPUs by default): each
    results file says where it ran — the CPU and torch's threads here, the GPU's name and its
    TF32 flags on CUDA."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        r = run(fast(strategy="naive", epochs=0.5))
    finally:
        torch.set_num_threads(threads)
    assert r["hardware"]["device"].startswith("cpu (") and r["hardware"]["threads"] == "1"


def test_same_seed_same_numbers_other_seed_differs():
    a = run(fast(strategy="si", seed=3))
    b = run(fast(strategy="si", seed=3))
    c = run(fast(strategy="si", seed=4))
    assert a["accuracy_matrix"] == b["accuracy_matrix"]
    assert a["curves"] == b["curves"]
    assert a["accuracy_matrix"] != c["accuracy_matrix"]


@pytest.mark.parametrize("strategy", ["naive", "joint", "ewc", "online-ewc", "si", "mas", "l2"])
@pytest.mark.parametrize("scenario", ["task", "domain", "class"])
def test_every_strategy_and_scenario_runs(strategy, scenario):
    r = run(fast(strategy=strategy, scenario=scenario, epochs=1.0))
    assert r["strategy"] == strategy and r["scenario"] == scenario
    assert len(r["accuracy_matrix"]) == 5


def test_ewc_forgets_less_than_naive_and_joint_is_the_upper_bound():
    base = dict(benchmark="permuted-digits", n_tasks=3, scenario="domain", epochs=10.0)
    naive = run(fast(strategy="naive", **base))
    ewc_ = run(fast(strategy="ewc", lam=1e3, **base))
    joint = run(fast(strategy="joint", **base))
    assert ewc_["metrics"]["forgetting"] < naive["metrics"]["forgetting"]
    assert joint["metrics"]["acc"] > naive["metrics"]["acc"]


def test_class_scenario_masks_unseen_classes():
    """After task 1 of class-incremental split-digits, task-2 classes were never trained, so
    accuracy on them (evaluated among seen classes) is 0 for the first task's model."""
    r = run(fast(strategy="naive", scenario="class", epochs=1.0))
    # R[0][1]: task 1's classes are unseen after task 0 -> evaluated among classes of tasks 0..1,
    # the untrained outputs may win sometimes; the trained task must be far above chance.
    assert r["accuracy_matrix"][0][0] > 0.9
    # Naive class-incremental learning forgets the earlier tasks completely (a known result).
    assert r["accuracy_matrix"][-1][0] < 0.2


def test_gradient_and_autograd_penalty_paths_agree():
    a = run(fast(strategy="ewc", penalty="grad", lam=100.0))
    b = run(fast(strategy="ewc", penalty="autograd", lam=100.0))
    for ra, rb in zip(a["accuracy_matrix"], b["accuracy_matrix"], strict=True):
        assert ra == pytest.approx(rb, abs=0.02)


def test_own_stream_and_model():
    g = torch.Generator().manual_seed(0)
    tasks = []
    for shift in (0.0, 3.0):
        x = torch.randn(200, 5, generator=g) + shift
        y = (x[:, 0] > shift).long()
        tasks.append((x[:150], y[:150], x[150:], y[150:]))
    stream = stream_from_tensors(tasks, scenario="domain", name="toy")
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    cfg = RunConfig(strategy="ewc", lam=10.0, epochs=20.0, batch_size=32, lr=1e-2)
    r = run(cfg, stream=stream, model=model)
    assert r["benchmark"] == "toy"
    assert r["accuracy_matrix"][-1][-1] > 0.8


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(strategy="ewx"), "unknown strategy 'ewx'"),
        (dict(optimizer="rmsprop"), "unknown optimizer"),
        (dict(fisher="diag"), "unknown fisher kind"),
        (dict(lr=-1.0), "lr: expected a finite number > 0, got -1.0"),
        (dict(lam=float("nan")), "lam: expected a finite number >= 0"),
        (dict(evaluate_on="val"), "val_fraction > 0"),
        (dict(val_fraction=1.5), "val_fraction"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        resolve_config(fast(**kw))


def test_unknown_config_key():
    with pytest.raises(ConfigError, match=r"unknown config key.*'lamda'"):
        RunConfig.from_dict({"lamda": 3})


def test_compare_writes_files_and_resumes(tmp_path):
    cfg = fast(epochs=1.0)
    first = compare(cfg, ["naive", "ewc"], [0, 1], tmp_path)
    files = sorted(p.name for p in tmp_path.glob("*.json"))
    assert files == ["ewc-seed0.json", "ewc-seed1.json", "naive-seed0.json", "naive-seed1.json"]
    assert (tmp_path / "summary.csv").read_text().count("\n") == 5
    stamp = load_results(tmp_path / "ewc-seed0.json")["created"]
    again = compare(cfg, ["naive", "ewc"], [0, 1], tmp_path)  # resumed: nothing rerun
    assert load_results(tmp_path / "ewc-seed0.json")["created"] == stamp
    assert [r["accuracy_matrix"] for r in again] == [r["accuracy_matrix"] for r in first]
    compare(dataclasses.replace(cfg, lr=2e-3), ["ewc"], [0], tmp_path)  # config changed: rerun
    assert load_results(tmp_path / "ewc-seed0.json")["config"]["lr"] == 2e-3


def test_sweep_chooses_on_validation(tmp_path):
    summary = sweep(fast(strategy="ewc", epochs=1.0), [1.0, 1e3], tmp_path)
    assert summary["chosen"] in (1.0, 1e3)
    best = max(summary["points"], key=lambda p: p["val_acc"])
    assert summary["chosen"] == best["value"]
    point = load_results(tmp_path / "lam=1000.json")
    assert point["config"]["evaluate_on"] == "val" and point["config"]["val_fraction"] == 0.1
    final = load_results(tmp_path / "final.json")
    assert final["config"]["evaluate_on"] == "test" and final["config"]["lam"] == summary["chosen"]
    assert load_results(tmp_path / "sweep.json")["schema"] == "ewc.sweep/1"


def test_empty_grid():
    with pytest.raises(ConfigError, match="grid is empty"):
        sweep(fast(), [], "unused")


def test_only_the_settings_that_apply_are_recorded():
    cnn = applicable_settings(
        resolve_config(RunConfig(benchmark="split-mnist", model="cnn", strategy="naive"))
    )
    assert cnn["model"] == "cnn" and cnn["download"] is True and "epochs" in cnn
    not_for_naive_cnn = {"hidden", "lam", "gamma", "xi", "fisher", "fisher_samples", "penalty"}
    assert not not_for_naive_cnn & set(cnn)
    assert not {"iterations", "max_train_samples", "val_fraction", "extra"} & set(cnn)  # unset
    si = applicable_settings(resolve_config(RunConfig(benchmark="split-digits", strategy="si")))
    assert si["xi"] == 0.1 and si["hidden"] == [100, 100] and "lam" in si and "penalty" in si
    assert not {"gamma", "fisher", "data_dir", "download"} & set(si)  # offline: no data folder
    own = applicable_settings(resolve_config(fast(strategy="ewc")), own_model=True, own_stream=True)
    assert not {"model", "hidden", "benchmark", "n_tasks"} & set(own) and own["fisher"] == "exact"


def test_results_name_layers_by_module_path_type_and_shape():
    r = run(fast(strategy="ewc", scenario="task", epochs=1.0))
    labels = {k: v["label"] for k, v in r["importance"][0]["layers"].items()}
    assert labels == {
        "1.weight": "1: Linear.weight (32×64)",
        "1.bias": "1: Linear.bias (32)",
        "3.weight": "3: Linear.weight (10×32)",
        "3.bias": "3: Linear.bias (10)",
    }
    assert r["settings"] == applicable_settings(
        resolve_config(fast(strategy="ewc", scenario="task", epochs=1.0))
    )


def test_naive_training_is_a_plain_pytorch_loop():
    """The runner's naive fine-tuning is the textbook loop: per task, reshuffled batches drawn
    from the run's generator, mean cross-entropy, one Adam kept across tasks (the fused kernel
    against PyTorch's default one). Same weights after two tasks, to float rounding."""
    g = torch.Generator().manual_seed(0)
    tasks = [
        (torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g)) for _ in "ab"
    ]
    stream = stream_from_tensors([(x, y, x[:4], y[:4]) for x, y in tasks], scenario="domain")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    reference = copy.deepcopy(model)
    cfg = RunConfig(strategy="naive", iterations=7, batch_size=16, lr=1e-2, seed=3)
    run(cfg, stream=stream, model=model)

    generator = torch.Generator().manual_seed(3)
    adam = torch.optim.Adam(reference.parameters(), lr=1e-2)
    for x, y in tasks:
        done = 0
        while done < 7:  # epochs of 16, 16, 8 samples
            for idx in torch.randperm(len(y), generator=generator).split(16)[: 7 - done]:
                adam.zero_grad()
                F.cross_entropy(reference(x[idx]), y[idx]).backward()
                adam.step()
                done += 1
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
