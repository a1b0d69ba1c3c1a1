"""One run's settings: :class:`RunConfig`, its resolution against the benchmark's protocol
(:mod:`ewc.runner.protocols`), and which settings apply to which strategy."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ewc.config import ConfigError, check_device, check_fields, did_you_mean
from ewc.data.streams import BENCHMARKS, check_benchmark
from ewc.fisher import KINDS as FISHER_KINDS
from ewc.models import MODEL_NAMES
from ewc.regularizers import REGULARIZERS, Regularizer, make_regularizer
from ewc.runner.masks import masked_forward
from ewc.runner.protocols import (
    BENCHMARK_DEFAULTS,
    DEFAULT_BENCHMARK,
    GENERIC_LAM,
    GLOBAL_DEFAULTS,
    OPTIMIZERS,
    PARALLEL,
    PENALTY_PATHS,
    REGULARIZED,
    STRATEGIES,
)
from ewc.tables import setting_text


@dataclass
class RunConfig:
    """Everything that defines one run. ``None`` means "the benchmark's published default".

    Attributes:
        benchmark: task stream name (see :func:`ewc.data.streams.make_stream`); its protocol
            fills the unset fields. ``None``: :data:`DEFAULT_BENCHMARK`, except for a stream of
            your own given to :func:`ewc.runner.run`, which then takes the generic protocol
            (:data:`GLOBAL_DEFAULTS`; name a benchmark to take its protocol instead).
        strategy: one of :data:`STRATEGIES`.
        scenario: ``"task"``, ``"domain"`` or ``"class"`` (van de Ven et al. 2022).
        n_tasks: number of tasks, for benchmarks that take one (permuted, rotated).
        model: ``"mlp"`` or ``"cnn"``; ``hidden``: MLP hidden widths.
        epochs: passes over each task's training set (may be fractional);
            ``iterations``: optimizer steps per task (overrides ``epochs``).
        batch_size: samples per step; ``lr``: learning rate; ``optimizer``: ``"adam"`` or ``"sgd"``.
        lam: regularization strength λ in ``(λ/2) Σ Ω (θ - θ*)²``.
        gamma: online EWC decay γ in (0, 1]; ``xi``: SI damping ξ.
        fisher: Fisher kind for EWC (exact, sampled, empirical, batched);
            ``fisher_samples``: samples per Fisher estimate (``None`` = the whole training set).
        normalize: EWC's Fisher normalisation (``"mean"``, ``"max"``, ``"rewrite"``:
            :mod:`ewc.regularizers.scale`; ``None``: the raw Fisher,
            and the key is left out of :meth:`to_dict`, so configs and results files from before
            the option still match).
        seed: seeds model initialisation, data order, permutations and validation splits.
        data_dir: where MNIST-format files are (else ``$EWC_DATA_DIR``, cache, download).
        download: allow downloading missing data.
        device: torch device for the model and data (``"cpu"``, ``"cuda"``).
        eval_every: optimizer steps between curve points (``None``: about 10 per task).
        curve_samples: test samples per task used for curve points (the matrix uses all).
        val_fraction: fraction of each task's training set held out for validation.
        evaluate_on: ``"test"``, or ``"val"`` to choose hyper-parameters without test data.
        max_train_samples: use at most this many training samples a task (fast demos, tests).
        penalty: how the penalty enters each step (default: ``"proximal"`` with SGD,
            ``"grad"`` otherwise): ``"grad"`` (its closed-form gradient added to ``.grad``),
            ``"autograd"`` (added to the loss), or ``"proximal"`` (an implicit step after the
            optimizer's, stable for any λ: exact proximal gradient for SGD, a
            decoupled pull towards the anchor for Adam, like AdamW's weight decay).
        parallel: under ``torchrun``, ``"ddp"`` (every rank holds the whole model) or
            ``"fsdp"`` (``fully_shard``: each rank holds its shard of the parameters and of the
            regularizer's state; not with K-FAC); ignored in a single process.
    """

    benchmark: str | None = None
    strategy: str = "ewc"
    scenario: str | None = None
    n_tasks: int | None = None
    model: str | None = None
    hidden: tuple[int, ...] | None = None
    epochs: float | None = None
    iterations: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    optimizer: str | None = None
    lam: float | None = None
    gamma: float = 1.0
    xi: float = 0.1
    fisher: str = "exact"
    fisher_samples: int | None = None
    normalize: str | None = None
    seed: int = 0
    data_dir: str | None = None
    download: bool = True
    device: str = "cpu"
    eval_every: int | None = None
    curve_samples: int = 1000
    val_fraction: float = 0.0
    evaluate_on: str = "test"
    max_train_samples: int | None = None
    penalty: str | None = None
    parallel: str = "ddp"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Coerce each field to its type and check its range (:func:`ewc.config.check_fields`)."""
        check_fields(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Build from a plain dict (a YAML/TOML config), rejecting unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"unknown config key(s) {', '.join(map(repr, unknown))}; "
                f"valid keys: {', '.join(sorted(known - {'extra'}))}"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden) if self.hidden is not None else None
        for name, default in _NEWER_FIELDS.items():
            if d[name] == default:  # absent from older results files and checkpoints
                del d[name]
        return d


#: Fields newer than the results files and checkpoints a config must still match on resume:
#: left out of :meth:`RunConfig.to_dict` at their defaults.
_NEWER_FIELDS: dict[str, Any] = {"normalize": None, "parallel": "ddp"}


def choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ConfigError(
            f"unknown {name} {value!r}{did_you_mean(value, choices)}; choose one of "
            f"{', '.join(map(str, choices))}"
        )


def resolve_config(config: RunConfig, own_stream: bool = False) -> RunConfig:
    """Fill unset fields from the benchmark's protocol and validate every field up front.

    Types and ranges are checked when the :class:`RunConfig` is built; this adds the choices
    (strategy, model, ...), the device, and contradictions: both ``epochs`` and ``iterations``,
    or a setting that the strategy never reads (:func:`unused_settings`). Without a benchmark,
    :data:`DEFAULT_BENCHMARK`'s; with ``own_stream`` (a stream of your own), the generic
    protocol (:data:`GLOBAL_DEFAULTS`), the benchmark left unset.
    """
    if not own_stream:  # a stream of one's own may take any name (or none)
        benchmark = config.benchmark or DEFAULT_BENCHMARK
        check_benchmark(benchmark)
        config = dataclasses.replace(config, benchmark=benchmark)
    choice("strategy", config.strategy, STRATEGIES)
    if config.epochs is not None and config.iterations is not None:
        raise ConfigError(
            f"epochs={config.epochs:g} and iterations={config.iterations} both set; "
            "set only one (iterations would override epochs)"
        )
    unused = unused_settings(config, [config.strategy])
    if unused:
        raise ConfigError(f"{unused[0]}; remove it or choose a strategy that uses it")
    protocol = BENCHMARK_DEFAULTS.get(config.benchmark or "", {})
    filled: dict[str, Any] = {}
    for name, default in {**GLOBAL_DEFAULTS, **protocol}.items():
        if name not in ("lam", "iterations") and getattr(config, name) is None:
            filled[name] = default
    scenario = config.scenario
    if config.benchmark in BENCHMARKS:
        spec = BENCHMARKS[config.benchmark]
        scenario = filled["scenario"] = scenario or spec.default_scenario
        choice(f"scenario for {config.benchmark}", scenario, spec.scenarios)
        if config.n_tasks is not None and config.n_tasks > (spec.max_n_tasks or config.n_tasks):
            raise ConfigError(
                f"n_tasks: {config.benchmark} has at most {spec.max_n_tasks} tasks, "
                f"got {config.n_tasks}"
            )
    if config.lam is None and config.strategy in REGULARIZED:
        table = protocol.get("lam", {})
        fallback = table.get(config.strategy, GENERIC_LAM[config.strategy])
        filled["lam"] = table.get(f"{config.strategy}/{scenario}", fallback)
    if config.iterations is not None:
        filled.pop("epochs", None)  # the protocol's epochs would contradict the given iterations
    elif "iterations" in protocol and config.epochs is None:
        filled["iterations"] = protocol["iterations"]
    proximal = config.strategy not in REGULARIZERS or REGULARIZERS[config.strategy].proximal
    if config.penalty is None and config.strategy in REGULARIZERS:  # naive, joint: no penalty
        optimizer = config.optimizer or protocol.get("optimizer", GLOBAL_DEFAULTS["optimizer"])
        filled["penalty"] = "proximal" if optimizer == "sgd" and proximal else "grad"
    cfg = dataclasses.replace(config, **filled)
    choice("model", cfg.model, MODEL_NAMES)
    choice("optimizer", cfg.optimizer, OPTIMIZERS)
    choice("fisher kind", cfg.fisher, FISHER_KINDS)
    if cfg.penalty is not None:
        paths = PENALTY_PATHS if proximal else ("grad", "autograd")  # no proximal_step (K-FAC)
        choice(f"penalty path for {cfg.strategy}", cfg.penalty, paths)
    choice("evaluate_on", cfg.evaluate_on, ("test", "val"))
    check_device(cfg.device)
    reads_files = not (cfg.benchmark or "").endswith("-digits")
    if reads_files and cfg.data_dir is not None and not Path(cfg.data_dir).expanduser().is_dir():
        raise ConfigError(
            f"data_dir {cfg.data_dir!r} is not a folder; give the folder that holds mnist/ and "
            "fashion-mnist/, or leave it unset ($EWC_DATA_DIR, the cache, a download)"
        )
    choice("parallel", cfg.parallel, PARALLEL)
    if cfg.parallel == "fsdp" and cfg.strategy == "kfac":
        raise ConfigError(
            "strategy 'kfac' does not support parallel='fsdp': its Kronecker-factored penalty "
            "needs each layer unsharded at every step. Use strategy 'ewc' (diagonal), whose "
            "state is sharded with the parameters, or parallel='ddp'."
        )
    if cfg.evaluate_on == "val" and cfg.val_fraction == 0:
        raise ConfigError("evaluate_on='val' needs a validation split: set val_fraction > 0")
    if cfg.strategy in REGULARIZERS:
        try:  # the regularizer's own checks, on a stand-in model, before any data is loaded
            build_regularizer(cfg, nn.Linear(1, 1))
        except ValueError as e:
            raise ConfigError(f"strategy {cfg.strategy!r}: {e}") from None
    return cfg


#: Settings that only some strategies read: field -> the strategies that read it (from the
#: registry's :attr:`~ewc.regularizers.Strategy.settings`).
STRATEGY_SETTINGS: dict[str, tuple[str, ...]] = {
    name: tuple(s for s, strategy in REGULARIZERS.items() if name in strategy.settings)
    for name in dict.fromkeys(f for strategy in REGULARIZERS.values() for f in strategy.settings)
} | {"penalty": REGULARIZED}  # how the penalty enters each step: the runner's, for every one


def unused_settings(config: RunConfig, strategies: Sequence[str]) -> list[str]:
    """The settings of ``config`` changed from their defaults (the field's, or the benchmark
    protocol's) that none of ``strategies`` reads, each as ``"name=value is read only by ..."``.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    protocol = BENCHMARK_DEFAULTS.get(config.benchmark or "", {})
    return [
        f"{name}={getattr(config, name)!r} is read only by {', '.join(users)}, "
        f"not by {', '.join(strategies)}"
        for name, users in STRATEGY_SETTINGS.items()
        if getattr(config, name) not in (None, defaults[name], protocol.get(name))
        and not set(users) & set(strategies)
    ]


def applicable_settings(
    cfg: RunConfig, own_model: bool = False, own_stream: bool = False
) -> dict[str, Any]:
    """The fields of a resolved config that matter to its run, as plain values, for reports:
    ``hidden`` only for the built-in MLP, ``epochs`` or ``iterations`` (whichever counts), λ and
    the penalty path only for regularizers, γ for online EWC, ξ for SI, the Fisher's settings for
    EWC, the data folder for benchmarks read from files, validation settings with a split, and
    options left unset (``None``: the default behaviour) not at all. ``own_model``: a model
    given to :func:`run` (its name and widths do not apply); ``own_stream``: a stream given to
    it (the benchmark name, task count and data settings do not).
    """
    settings = cfg.to_dict()
    unused = {"iterations"} if cfg.iterations is None else {"epochs"}
    if cfg.model != "mlp" or own_model:
        unused.add("hidden")
    if own_model:
        unused.add("model")
    if cfg.strategy not in REGULARIZED:
        unused |= {"lam", "penalty"}
    if cfg.strategy != "online-ewc":
        unused.add("gamma")
    if cfg.strategy != "si":
        unused.add("xi")
    if cfg.strategy not in ("ewc", "online-ewc"):
        unused |= {"fisher", "fisher_samples", "normalize"}
    if own_stream:
        unused |= {"benchmark", "n_tasks"}
    if own_stream or (cfg.benchmark or "").endswith("-digits"):
        unused |= {"data_dir", "download"}
    if cfg.val_fraction == 0:
        unused |= {"val_fraction", "evaluate_on"}
    if cfg.parallel == "ddp":  # the default, and nothing to record outside torchrun
        unused.add("parallel")
    return {k: v for k, v in settings.items() if k not in unused and v is not None and v != {}}


def describe_protocol(benchmark: str) -> str:
    """What a benchmark's unset settings take, in a few words: ``"mlp 100,100, 20 epochs a
    task, batch 32, adam lr 0.001, scenario task"`` (λ: per strategy, docs/defaults.md)."""
    p = {**GLOBAL_DEFAULTS, **BENCHMARK_DEFAULTS.get(benchmark, {})}
    model = f"mlp {setting_text(p['hidden'])}" if p["model"] == "mlp" else p["model"]
    epochs = f"{p['epochs']:g} epoch{'' if p['epochs'] == 1 else 's'}"
    length = f"{p['iterations']} steps" if "iterations" in p else epochs
    spec = BENCHMARKS.get(benchmark)
    scenario = f", scenario {spec.default_scenario}" if spec is not None else ""
    optimizer = f"{p['optimizer']} lr {p['lr']:g}"
    return f"{model}, {length} a task, batch {p['batch_size']}, {optimizer}{scenario}"


def build_regularizer(cfg: RunConfig, model: nn.Module) -> Regularizer:
    """The strategy's regularizer, given the RunConfig fields its registry entry names."""
    strategy = REGULARIZERS[cfg.strategy]
    kwargs: dict[str, Any] = {"lam": cfg.lam, **{o: getattr(cfg, o) for o in strategy.options}}
    if strategy.uses_data:
        kwargs["forward"] = masked_forward
    return make_regularizer(cfg.strategy, model, **kwargs)
