"""EWC's consolidation stats, the weak-penalty warning and the Fisher normalisations
(ewc.regularizers.scale)."""

from __future__ import annotations

import copy
import json
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from ewc.config import ConfigError
from ewc.fisher import fisher_diagonal
from ewc.regularizers import EWC, OnlineEWC, make_regularizer
from ewc.regularizers.scale import (
    CERTAIN,
    PROBE_SAMPLES,
    WEAK_MARGIN,
    WeakPenaltyWarning,
    importance_scale,
    rewrite_costs,
    strength,
)
from ewc.runner import RunConfig, resolve_config


def mlp(seed: int = 0, scale: float = 1.0) -> nn.Module:
    """A tiny MLP; ``scale`` multiplies its last layer (large: a near-certain model)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        model[2].weight.mul_(scale)
        model[2].bias.mul_(scale)
    return model


def separable(scale: float) -> tuple[nn.Module, list[tuple[Tensor, Tensor]]]:
    """A linear classifier and 48 samples it classifies with a margin of at least ``0.5 *
    scale`` nats: with ``scale=30`` it is near-certain (its Fisher about 1e-9) and trained
    nets that fit their task look like it; with ``scale=1`` it is unsure."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 4, generator=g, dtype=torch.float64)
    x = torch.randn(200, 4, generator=g, dtype=torch.float64)
    top2 = (x @ w.T).topk(2).values
    x = x[top2[:, 0] - top2[:, 1] > 0.5][:48]
    y = (x @ w.T).argmax(1)
    model = nn.Linear(4, 3).double()
    with torch.no_grad():
        model.weight.copy_(scale * w)
        model.bias.zero_()
    return model, [(x[:24], y[:24]), (x[24:], y[24:])]


def batches(n: int = 12, size: int = 6, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[i : i + size], y[i : i + size]) for i in range(0, n, size)]


def consolidated(model: nn.Module, lam: float, data: list, **kwargs: object) -> EWC:
    """An EWC consolidated on ``data``, with its warnings silenced."""
    reg = EWC(model, lam=lam, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", WeakPenaltyWarning)
        reg.consolidate(data)
    return reg


def test_stats_hold_the_fishers_scale_per_layer_as_computed_directly() -> None:
    model, data = mlp(), batches()
    reg = consolidated(model, 1.0, data)
    fisher = fisher_diagonal(model, data)
    (stats,) = reg.stats
    flat = torch.cat([f.flatten() for f in fisher.values()])
    assert stats["fisher_mean"] == pytest.approx(float(flat.mean()), rel=1e-12)
    assert stats["fisher_max"] == float(flat.max())
    assert set(stats["layers"]) == set(fisher) and stats["normalizer"] == 1.0
    for name, f in fisher.items():
        q = torch.quantile(f.flatten(), torch.tensor([0.5, 0.9, 0.99], dtype=f.dtype))
        layer = stats["layers"][name]
        assert layer["mean"] == pytest.approx(float(f.mean()), rel=1e-12)
        assert layer["max"] == float(f.max())
        assert [layer["q50"], layer["q90"], layer["q99"]] == pytest.approx(q.tolist(), rel=1e-12)
        anchor = dict(model.named_parameters())[name].detach()
        expected = 0.5 * float((f * anchor.square()).sum())
        assert stats["rewrite"][name] == pytest.approx(expected, rel=1e-12)
    assert stats["probe_s"] >= 0


def test_confidence_is_read_from_the_first_probe_samples_only() -> None:
    model = mlp()
    size = PROBE_SAMPLES // 2 + 10  # the second batch is cut: 256 samples of 3 batches
    data = batches(n=3 * size, size=size)
    (stats,) = consolidated(model, 1.0, iter(data)).stats  # a one-pass iterable
    with torch.no_grad():
        p = torch.softmax(model(torch.cat([x for x, _ in data])[:PROBE_SAMPLES]), -1)
    assert stats["confidence"]["max_prob"] == pytest.approx(float(p.max(-1).values.mean()))
    entropy = float(-(p * p.log()).sum(-1).mean())
    assert stats["confidence"]["entropy"] == pytest.approx(entropy)


def test_confidence_skips_ignored_positions_and_has_none_for_a_gaussian() -> None:
    model = mlp()
    x, y = batches()[0]
    y = y.clone()
    y[:3] = -100
    (stats,) = consolidated(model, 1.0, [(x, y)]).stats
    with torch.no_grad():
        p = torch.softmax(model(x[3:]), -1)
    assert stats["confidence"]["max_prob"] == pytest.approx(float(p.max(-1).values.mean()))
    gaussian = [(x, torch.randn(len(x), 3, dtype=x.dtype))]
    assert consolidated(model, 1.0, gaussian, likelihood="gaussian").stats[0]["confidence"] is None


def test_rewrite_costs_and_strength_by_hand() -> None:
    importance = {"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([[0.5, 0.0], [0.0, 0.5]])}
    anchor = {"a": torch.tensor([2.0, 1.0]), "b": torch.tensor([[2.0, 9.0], [9.0, 0.0]])}
    costs = rewrite_costs(importance, anchor)
    assert costs == {"a": 0.5 * (4 + 3), "b": 0.5 * (0.5 * 4)}  # 3.5 and 1.0
    sizes = {"a": 2, "b": 4}
    assert strength(0.5, costs, sizes) == {"unprotected": 4 / 6, "lam_half": 1.0}
    assert strength(1.0, costs, sizes)["unprotected"] == 0.0  # λ·cost = 1: protected
    assert strength(0.1, costs, sizes)["unprotected"] == 1.0
    assert strength(1.0, {"a": 0.0, "b": 0.0}, sizes)["lam_half"] == math.inf


def test_a_near_certain_model_gets_a_warning_naming_the_cause_and_the_remedy() -> None:
    model, data = separable(scale=30.0)
    reg = EWC(model, lam=1e3)
    with pytest.warns(WeakPenaltyWarning) as record:
        reg.consolidate(data)
    message = str(record[0].message)
    stats = reg.stats[0]
    assert stats["confidence"]["max_prob"] > CERTAIN
    assert stats["lam_half"] > 1e3 * WEAK_MARGIN
    assert "the penalty cannot matter" in message
    assert f"λ½ = {stats['lam_half']:.3g}" in message
    assert f"at this λ, {100 * stats['unprotected']:.0f}% cost less" in message
    assert "the Fisher vanished because the model is near-certain" in message
    assert f"mean Fisher = {stats['fisher_mean']:.3g}" in message
    assert f"mean max-probability = {stats['confidence']['max_prob']:.6f}" in message
    lam_half = stats["lam_half"]
    assert f"a λ from {lam_half:.0e} to {10 * lam_half:.0e}" in message
    assert "normalize='rewrite' with λ from 1 to 10" in message
    # The remedies hold: at λ½, and at λ = 1 normalised, it is silent.
    with warnings.catch_warnings():
        warnings.simplefilter("error", WeakPenaltyWarning)
        EWC(model, lam=lam_half).consolidate(data)
        EWC(model, lam=1.0, normalize="rewrite").consolidate(data)
    with pytest.warns(WeakPenaltyWarning) as record:
        EWC(model, lam=0.01, normalize="rewrite").consolidate(data)
    assert "normalize='rewrite'" not in str(record[0].message)


def test_the_warning_fires_below_the_margin_only() -> None:
    model, data = separable(scale=30.0)
    lam_half = consolidated(model, 1.0, data).stats[0]["lam_half"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", WeakPenaltyWarning)
        EWC(model, lam=1.01 * lam_half / WEAK_MARGIN).consolidate(data)
    with pytest.warns(WeakPenaltyWarning):
        EWC(model, lam=0.99 * lam_half / WEAK_MARGIN).consolidate(data)


def test_no_warning_for_the_same_lambda_on_an_unsure_model_nor_for_lambda_zero() -> None:
    model, data = separable(scale=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", WeakPenaltyWarning)
        reg = EWC(model, lam=1e4)
        reg.consolidate(data)
        EWC(separable(scale=30.0)[0], lam=0.0).consolidate(data)
    assert reg.stats[0]["unprotected"] == 3 / 15  # the biases only: anchored at zero, free


def test_no_warning_for_an_unsure_model_even_far_below_lam_half() -> None:
    """Unsure models can hold an old task far below λ½ (examples/hf_two_tasks.py does at
    λ½/160): the warning is only for the near-certain case it was measured on."""
    model, data = separable(scale=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", WeakPenaltyWarning)
        reg = EWC(model, lam=1e-6)
        reg.consolidate(data)
    stats = reg.stats[0]
    assert stats["confidence"]["max_prob"] < CERTAIN
    assert stats["lam_half"] > 1e-6 * WEAK_MARGIN


@settings(max_examples=25, deadline=None)
@given(
    scale=st.floats(min_value=1e-12, max_value=1e12),
    normalize=st.sampled_from(["mean", "max", "rewrite"]),
    online=st.booleans(),
)
def test_normalised_penalty_is_invariant_to_scaling_the_fisher(
    scale: float, normalize: str, online: bool
) -> None:
    model = mlp()
    g = torch.Generator().manual_seed(0)
    tasks = [
        {n: torch.rand(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}
        for _ in range(2)
    ]
    cls = OnlineEWC if online else EWC
    plain, scaled = (cls(model, lam=2.0, normalize=normalize) for _ in range(2))
    for t, fisher in enumerate(tasks):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * (t + 1))
        plain.add_task(fisher)
        scaled.add_task({n: scale * f for n, f in fisher.items()})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    torch.testing.assert_close(scaled.penalty(), plain.penalty(), rtol=1e-9, atol=0)
    for n, omega in plain.importance.items():
        torch.testing.assert_close(scaled.importance[n], omega, rtol=1e-9, atol=0)
    assert scaled.stats[0]["normalizer"] == pytest.approx(scale * plain.stats[0]["normalizer"])


@pytest.mark.parametrize("normalize", ["mean", "max"])
def test_normalised_importance_has_unit_mean_or_max(normalize: str) -> None:
    reg = consolidated(mlp(), 1.0, batches(), normalize=normalize)
    flat = torch.cat([o.flatten() for o in reg.importance.values()])
    reduced = flat.mean() if normalize == "mean" else flat.max()
    assert float(reduced) == pytest.approx(1.0, rel=1e-12)
    assert reg.stats[0]["normalizer"] == pytest.approx(reg.stats[0][f"fisher_{normalize}"])


def test_rewrite_normalisation_puts_the_half_protecting_lambda_at_one() -> None:
    model, data = mlp(), batches()
    raw = consolidated(model, 1.0, data).stats[0]
    (stats,) = consolidated(model, 1.0, data, normalize="rewrite").stats
    assert stats["lam_half"] == pytest.approx(1.0, rel=1e-9)
    assert stats["normalizer"] == pytest.approx(1.0 / raw["lam_half"], rel=1e-12)
    assert stats["rewrite"] == pytest.approx(
        {n: c * raw["lam_half"] for n, c in raw["rewrite"].items()}
    )


def test_an_all_zero_fisher_is_left_as_it_is() -> None:
    model = mlp()
    reg = EWC(model, lam=1.0, normalize="mean")
    reg.add_task({n: torch.zeros_like(p) for n, p in model.named_parameters()})
    assert reg.stats[0]["normalizer"] == 1.0
    assert all(not o.any() for o in reg.importance.values())


def test_state_round_trips_with_normalize_and_stats() -> None:
    model = mlp()
    reg = consolidated(model, 3.0, batches(), normalize="mean", mode="online")
    state = reg.state_dict()
    assert state["normalize"] == "mean" and json.loads(state["stats"]) == reg.stats
    other = EWC(model, lam=1.0)
    other.load_state_dict(torch.load(_saved(state), weights_only=True))
    assert other.normalize == "mean" and other.stats == reg.stats
    torch.testing.assert_close(other.penalty(), reg.penalty(), rtol=0, atol=0)
    other.stats[0]["fisher_mean"] = -1.0  # the loaded stats are a copy
    assert json.loads(reg.state_dict()["stats"])[0]["fisher_mean"] > 0


def _saved(state: dict) -> object:
    import io

    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize(
    "where",
    [
        ("fisher_mean",),
        ("confidence", "entropy"),
        ("layers", "0.weight", "q90"),
        ("layers", "2.bias"),
        ("rewrite", "0.bias"),
    ],
)
@pytest.mark.parametrize("edit", ["drop", "type"])
def test_an_edited_value_inside_the_stats_is_refused(where: tuple[str, ...], edit: str) -> None:
    model = mlp()
    reg = consolidated(model, 3.0, batches())
    state = reg.state_dict()
    stats = json.loads(state["stats"])
    parent = stats[0]
    for key in where[:-1]:
        parent = parent[key]
    if edit == "drop":
        del parent[where[-1]]
    else:
        parent[where[-1]] = "edited"
    state["stats"] = json.dumps(stats)
    with pytest.raises(ValueError, match=r"state dict 'stats': task 0: "):
        EWC(model, lam=1.0).load_state_dict(state)


def test_stats_of_an_added_task_have_every_key_and_load_back() -> None:
    model = mlp()
    reg = EWC(model, lam=1.0)
    reg.add_task({n: torch.ones_like(p) for n, p in model.named_parameters()})
    assert reg.stats[0]["confidence"] is None and reg.stats[0]["probe_s"] == 0.0
    EWC(model, lam=1.0).load_state_dict(reg.state_dict())


def test_a_state_dict_from_before_normalize_and_stats_still_loads() -> None:
    model = mlp()
    reg = consolidated(model, 3.0, batches())
    old = {k: v for k, v in reg.state_dict().items() if k not in ("normalize", "stats")}
    other = EWC(model, lam=1.0, normalize="mean")
    other.load_state_dict(old)
    assert other.normalize is None and other.stats == [] and other.n_tasks == 1
    torch.testing.assert_close(other.penalty(), reg.penalty(), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"normalize": "sum"}, r"state dict 'normalize': unknown normalize='sum'"),
        ({"stats": {"a": 1}}, r"state dict 'stats': should be a list of 1 dicts"),
        ({"stats": []}, r"state dict 'stats': should be a list of 1 dicts"),
        ({"stats": [1.0]}, r"'stats': task 0: should be a dict with keys"),
        ({"stats": "edited"}, r"'stats' is not the JSON that state_dict\(\) writes"),
    ],
)
def test_a_bad_normalize_or_stats_in_a_state_dict_is_refused_unchanged(
    change: dict, match: str
) -> None:
    model = mlp()
    reg = consolidated(model, 3.0, batches())
    before = copy.deepcopy(reg.state_dict())
    with pytest.raises(ValueError, match=match):
        reg.load_state_dict({**reg.state_dict(), **change})
    assert reg.stats == json.loads(before["stats"]) and reg.normalize is None


def test_an_unknown_normalize_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown normalize='sum'; choose one of mean, max, rewr"):
        EWC(mlp(), lam=1.0, normalize="sum")
    with pytest.raises(ValueError, match=r"unknown normalize='l2'"):
        make_regularizer("online-ewc", mlp(), lam=1.0, normalize="l2")


def test_run_config_normalize_is_left_out_of_old_configs_and_read_by_ewc_only() -> None:
    assert "normalize" not in RunConfig().to_dict()  # old results files and checkpoints match
    assert RunConfig(normalize="mean").to_dict()["normalize"] == "mean"
    old = RunConfig().to_dict()
    assert RunConfig.from_dict(old).to_dict() == old
    assert resolve_config(RunConfig(strategy="online-ewc", normalize="max")).normalize == "max"
    with pytest.raises(ConfigError, match="normalize='mean' is read only by ewc, online-ewc"):
        resolve_config(RunConfig(strategy="si", normalize="mean"))
    with pytest.raises(ConfigError, match="unknown normalize='sum'"):
        resolve_config(RunConfig(strategy="ewc", normalize="sum"))


def test_the_hugging_face_callback_passes_normalize_on() -> None:
    pytest.importorskip("transformers")
    from ewc.integrations.huggingface import EWCCallback

    with pytest.raises(ValueError, match="unknown normalize='sum'"):
        EWCCallback(lam=1.0, normalize="sum")
    callback = EWCCallback(lam=1.0, normalize="mean")
    assert callback._continual.bind(mlp()).normalize == "mean"  # type: ignore[attr-defined]


def test_a_tiny_bert_made_near_certain_is_warned_about_but_not_with_normalised_lambda() -> None:
    """The issue's case: a small transformer fine-tuned with Adam until it is near-certain."""
    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
    from toy_text_tasks import TokenTask, tiny_bert

    task = TokenTask("a", 256, seed=0)
    model = tiny_bert(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(6):
        for i in range(0, len(task), 32):
            logits = model(input_ids=task.input_ids[i : i + 32]).logits
            loss = nn.functional.cross_entropy(logits, task.labels[i : i + 32])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    def forward(m: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return m(input_ids=batch["input_ids"]).logits, batch["labels"]

    data = [{"input_ids": task.input_ids, "labels": task.labels}]
    reg = EWC(model, lam=1e5, forward=forward)
    with pytest.warns(WeakPenaltyWarning, match="near-certain") as record:
        reg.consolidate(data)
    stats = reg.stats[0]
    assert stats["confidence"]["max_prob"] > 0.99
    layers = importance_scale(reg.importance)["layers"]
    encoder = [v["mean"] for n, v in layers.items() if ".encoder." in n and n.endswith("weight")]
    assert max(encoder) < 1e-3 * layers["classifier.weight"]["mean"]  # the head dwarfs the rest
    assert "normalize='rewrite' with λ from 1 to 10" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error", WeakPenaltyWarning)
        EWC(model, lam=1.0, forward=forward, normalize="rewrite").consolidate(data)


def test_an_importance_file_records_the_normalisation_and_loads_unchanged(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    model = mlp()
    reg = consolidated(model, 3.0, batches(), normalize="rewrite")
    reg.save_pretrained(tmp_path / "fisher")
    loaded = EWC.from_pretrained(model, tmp_path / "fisher", lam=3.0, normalize="rewrite")
    assert loaded.stats[0]["normalizer"] == pytest.approx(1.0, rel=1e-6)  # already λ½ = 1
    for n, omega in reg.importance.items():
        torch.testing.assert_close(loaded.importance[n], omega, rtol=1e-6, atol=0)
    meta = json.loads((tmp_path / "fisher" / "importance.json").read_text())
    assert meta["normalize"] == "rewrite"
