"""One registry of strategies: the runner, the command line and the configs derive from it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ewc
from ewc.regularizers import REGULARIZERS, Regularizer, make_regularizer
from ewc.training import GENERIC_LAM, STRATEGIES, STRATEGY_SETTINGS, RunConfig, resolve_config


def test_the_runner_offers_every_registered_regularizer() -> None:
    assert set(REGULARIZERS) >= {"ewc", "online-ewc", "si", "mas", "l2", "kfac"}
    assert ("naive", "joint", *REGULARIZERS) == STRATEGIES
    assert {n: s.generic_lam for n, s in REGULARIZERS.items()} == GENERIC_LAM
    for name, strategy in REGULARIZERS.items():
        for setting in strategy.settings:
            assert name in STRATEGY_SETTINGS[setting]


@pytest.mark.parametrize("name", list(REGULARIZERS))
def test_each_strategy_builds_by_name_and_follows_the_protocol(name: str) -> None:
    reg = make_regularizer(name, nn.Linear(3, 2), lam=1.0)
    assert isinstance(reg, Regularizer)


@pytest.mark.parametrize("name", list(REGULARIZERS))
def test_each_strategy_runs_in_the_runner(name: str) -> None:
    """Every registry entry is wired: its options come from the config, its data (if any) is
    fed with the runner's output masks, and λ falls back to its generic value."""
    pytest.importorskip("sklearn")
    torch.manual_seed(0)
    config = RunConfig(
        benchmark="split-digits", strategy=name, n_tasks=2, epochs=1.0, max_train_samples=60
    )
    assert resolve_config(config).lam is not None
    result = ewc.run(config)
    assert len(result["accuracy_matrix"]) == 2
    assert len(result["importance"]) == 1  # consolidated after the first task


def test_a_strategy_without_proximal_step_refuses_the_proximal_penalty() -> None:
    assert not REGULARIZERS["kfac"].proximal
    with pytest.raises(ValueError, match="penalty"):
        resolve_config(RunConfig(benchmark="split-digits", strategy="kfac", penalty="proximal"))
    sgd = resolve_config(RunConfig(benchmark="split-digits", strategy="kfac", optimizer="sgd"))
    assert sgd.penalty == "grad"


def test_bad_options_are_refused_before_any_data_is_loaded() -> None:
    """KFAC has no batched Fisher: refused by resolve_config, from the class's own check."""
    with pytest.raises(ValueError, match="KFAC needs fisher in"):
        resolve_config(RunConfig(benchmark="split-mnist", strategy="kfac", fisher="batched"))
