"""The published protocols: each benchmark's model, optimizer, schedule and strengths, and the
strategies the runner offers (derived from the registry, :data:`ewc.regularizers.REGULARIZERS`).

Unset :class:`~ewc.runner.config.RunConfig` fields take these values
(:func:`~ewc.runner.config.resolve_config`); docs/defaults.md is generated from them.
"""

from __future__ import annotations

from typing import Any

from ewc.regularizers import REGULARIZERS

#: The registered regularizers (:data:`ewc.regularizers.REGULARIZERS`), and all strategies.
REGULARIZED = tuple(REGULARIZERS)
STRATEGIES = ("naive", "joint", *REGULARIZED)
OPTIMIZERS = ("adam", "sgd")
PENALTY_PATHS = ("grad", "autograd", "proximal")
#: How ``torchrun`` runs spread the model (``RunConfig.parallel``): replicated, or sharded.
PARALLEL = ("ddp", "fsdp")

# Hsu et al. 2018, "Re-evaluating continual learning scenarios": MLP 2x400, Adam, 4 epochs.
_HSU_2018: dict[str, Any] = dict(
    model="mlp", hidden=(400, 400), epochs=4.0, batch_size=128, lr=1e-3
)
# Offline benchmarks on scikit-learn's digits (no network needed): a small MLP, 20 epochs.
_DIGITS: dict[str, Any] = dict(model="mlp", hidden=(100, 100), epochs=20.0, batch_size=32, lr=1e-3)
# van de Ven et al. 2022, "Three types of incremental learning": 5000 iterations a task
# (GMvandeVen/continual-learning defaults for permMNIST). λ chosen on validation in the
# domain scenario with a shortened protocol (on 28x28 inputs), used for the task scenario too.
_VAN_DE_VEN: dict[str, Any] = dict(
    model="mlp", hidden=(1000, 1000), iterations=5000, batch_size=128, lr=1e-4,
    lam={"ewc": 1e2, "online-ewc": 1e2, "si": 1e2},
)  # fmt: skip

#: Published protocols; unlisted benchmarks (rotated-mnist) take the global defaults. ``lam``
#: maps ``"strategy/scenario"`` (or just ``"strategy"``) to the default strength chosen on
#: validation data (docs/results.md has the sweeps); strengths not listed fall back to
#: :data:`GENERIC_LAM`. The other keys are RunConfig fields.
BENCHMARK_DEFAULTS: dict[str, dict[str, Any]] = {
    # The seed notebook: SimpleCNN, Adam 1e-3, batch 512, 2 epochs a task, one shared head.
    # The exact Fisher of the CNN on 10,000 samples (~7x cheaper than on all 60,000).
    "fashion-mnist-to-mnist": dict(
        model="cnn",
        epochs=2.0,
        batch_size=512,
        lr=1e-3,
        fisher_samples=10000,
        # Chosen on validation from half-decade grids (docs/results.md); online EWC is EWC on
        # two tasks (the same state after one task).
        lam={"ewc": 3e3, "online-ewc": 3e3, "si": 3e3, "mas": 0.03, "l2": 0.03, "kfac": 10.0},
    ),
    "split-mnist": dict(
        **_HSU_2018,
        lam={
            "ewc/task": 1e4,
            "ewc/domain": 1e6,
            "ewc/class": 1e4,
            "online-ewc/task": 1e4,
            "online-ewc/domain": 1e8,
            "online-ewc/class": 1e4,
            "si/task": 1e3,
            "si/domain": 1e4,
            "si/class": 1e2,
            "mas/task": 0.1,
            "mas/domain": 1.0,
            "mas/class": 0.1,
            "l2/task": 1e-3,
            "l2/domain": 1e-3,
            "l2/class": 1e-4,
            "kfac/domain": 1e6,
        },
    ),
    "split-fashion-mnist": _HSU_2018,
    "permuted-mnist": _VAN_DE_VEN,
    "permuted-mnist-32": _VAN_DE_VEN,  # their exact input: padded to 32x32 before permuting
    # The digits benchmarks' strengths: chosen on validation for every scenario, 3 seeds
    # (scripts/choose_defaults.py; docs/defaults.md says where a regularizer cannot help).
    "split-digits": dict(
        _DIGITS,
        lam={
            "ewc/task": 1e3,
            "ewc/domain": 1e3,
            "ewc/class": 1.0,
            "online-ewc/task": 1e3,
            "online-ewc/domain": 1e2,
            "online-ewc/class": 1.0,
            "si/task": 1e2,
            "si/domain": 10.0,
            "si/class": 0.1,
            "mas/task": 0.1,
            "mas/domain": 0.01,
            "mas/class": 0.1,
            "l2/task": 1e-4,
            "l2/domain": 1e-4,
            "l2/class": 10.0,
            "kfac/task": 1e2,
            "kfac/domain": 1e2,
            "kfac/class": 10.0,
        },
    ),
    # SGD: with Adam, EWC barely holds the first task here (docs/results.md).
    "permuted-digits": dict(
        _DIGITS,
        lr=0.05,
        optimizer="sgd",
        lam={
            "ewc/task": 1e2,
            "ewc/domain": 10.0,
            "ewc/class": 10.0,
            "online-ewc/task": 1e2,
            "online-ewc/domain": 10.0,
            "online-ewc/class": 10.0,
            "si/task": 10.0,
            "si/domain": 1.0,
            "si/class": 1.0,
            "mas/task": 0.1,
            "mas/domain": 0.01,
            "mas/class": 0.01,
            "l2/task": 1e-3,
            "l2/domain": 0.01,
            "l2/class": 1e-4,
            # K-FAC's explicit penalty gradient diverges from λ = 10 at this SGD step size.
            "kfac/task": 1.0,
            "kfac/domain": 1.0,
            "kfac/class": 1.0,
        },
    ),
}
#: Untuned fallbacks, from the registry (the values chosen for task-incremental Split MNIST).
GENERIC_LAM = {name: strategy.generic_lam for name, strategy in REGULARIZERS.items()}
#: The benchmark of a config that names none (and is given no stream of its own).
DEFAULT_BENCHMARK = "split-digits"
#: What a benchmark without a published protocol (or a stream of your own) gets.
GLOBAL_DEFAULTS: dict[str, Any] = dict(
    model="mlp", hidden=(400, 400), epochs=1.0, batch_size=128, lr=1e-3, optimizer="adam"
)
