"""The sequential runner: a task stream and a strategy in, an accuracy matrix and curves out.

>>> from ewc.training import RunConfig, run
>>> result = run(RunConfig(benchmark="split-digits", strategy="ewc"))   # doctest: +SKIP
>>> result["accuracy_matrix"][-1]                                        # doctest: +SKIP

Strategies: ``naive`` (fine-tuning), ``joint`` (all data so far: the upper bound), and the
regularizers of :mod:`ewc.regularizers` (``ewc``, ``online-ewc``, ``si``, ``mas``, ``l2``).
Unset options take the benchmark's published protocol (:data:`BENCHMARK_DEFAULTS`).

The training loop is the plain PyTorch one: in-memory uint8 tensors, a batch is an index gather,
the regularizer's closed-form gradient is added to ``.grad`` after ``backward`` (or, with
``penalty="autograd"``, ``reg.penalty()`` is added to the loss).
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ewc import __version__, distributed
from ewc import checkpoint as checkpoints
from ewc.config import ConfigError, check_device, check_fields
from ewc.curves import Curves, penalty_value
from ewc.data.datasets import to_float
from ewc.data.streams import BENCHMARKS, Task, TaskStream, make_stream
from ewc.fisher import KINDS as FISHER_KINDS
from ewc.kfac import KFAC  # noqa: F401 (importing it registers the "kfac" strategy)
from ewc.logger import ScalarLogger
from ewc.metrics import compute_metrics
from ewc.models import MODEL_NAMES, build_model
from ewc.progress import Progress
from ewc.regularizers import (
    REGULARIZERS,
    QuadraticRegularizer,
    Regularizer,
    make_regularizer,
)
from ewc.results import (
    RESULTS_SCHEMA,
    SWEEP_SCHEMA,
    check_output,
    load_results,
    save_results,
    write_summary_csv,
)

#: The registered regularizers (:data:`ewc.regularizers.REGULARIZERS`), and all strategies.
REGULARIZED = tuple(REGULARIZERS)
STRATEGIES = ("naive", "joint", *REGULARIZED)
OPTIMIZERS = ("adam", "sgd")
PENALTY_PATHS = ("grad", "autograd", "proximal")

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
_GLOBAL_DEFAULTS: dict[str, Any] = dict(
    model="mlp", hidden=(400, 400), epochs=1.0, batch_size=128, lr=1e-3, optimizer="adam"
)


@dataclass
class RunConfig:
    """Everything that defines one run. ``None`` means "the benchmark's published default".

    Attributes:
        benchmark: task stream name (see :func:`ewc.data.streams.make_stream`).
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
    """

    benchmark: str = "split-digits"
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
        return d


def _choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choose one of {', '.join(map(str, choices))}")


def resolve_config(config: RunConfig) -> RunConfig:
    """Fill unset fields from the benchmark's protocol and validate every field up front.

    Types and ranges are checked when the :class:`RunConfig` is built; this adds the choices
    (strategy, model, ...), the device, and contradictions: both ``epochs`` and ``iterations``,
    or a setting that the strategy never reads (:func:`unused_settings`).
    """
    _choice("strategy", config.strategy, STRATEGIES)
    if config.epochs is not None and config.iterations is not None:
        raise ConfigError(
            f"epochs={config.epochs:g} and iterations={config.iterations} both set; "
            "set only one (iterations would override epochs)"
        )
    unused = unused_settings(config, [config.strategy])
    if unused:
        raise ConfigError(f"{unused[0]}; remove it or choose a strategy that uses it")
    protocol = BENCHMARK_DEFAULTS.get(config.benchmark, {})
    filled: dict[str, Any] = {}
    for name, default in {**_GLOBAL_DEFAULTS, **protocol}.items():
        if name not in ("lam", "iterations") and getattr(config, name) is None:
            filled[name] = default
    scenario = config.scenario
    if config.benchmark in BENCHMARKS:
        spec = BENCHMARKS[config.benchmark]
        scenario = filled["scenario"] = scenario or spec.default_scenario
        _choice(f"scenario for {config.benchmark}", scenario, spec.scenarios)
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
        optimizer = config.optimizer or protocol.get("optimizer", _GLOBAL_DEFAULTS["optimizer"])
        filled["penalty"] = "proximal" if optimizer == "sgd" and proximal else "grad"
    cfg = dataclasses.replace(config, **filled)
    _choice("model", cfg.model, MODEL_NAMES)
    _choice("optimizer", cfg.optimizer, OPTIMIZERS)
    _choice("fisher kind", cfg.fisher, FISHER_KINDS)
    if cfg.penalty is not None:
        paths = PENALTY_PATHS if proximal else ("grad", "autograd")  # no proximal_step (K-FAC)
        _choice(f"penalty path for {cfg.strategy}", cfg.penalty, paths)
    _choice("evaluate_on", cfg.evaluate_on, ("test", "val"))
    check_device(cfg.device)
    if cfg.evaluate_on == "val" and cfg.val_fraction == 0:
        raise ConfigError("evaluate_on='val' needs a validation split: set val_fraction > 0")
    if cfg.strategy in REGULARIZERS:
        try:  # the regularizer's own checks, on a stand-in model, before any data is loaded
            _make_regularizer(cfg, nn.Linear(1, 1))
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
    protocol = BENCHMARK_DEFAULTS.get(config.benchmark, {})
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
        unused |= {"fisher", "fisher_samples"}
    if own_stream:
        unused |= {"benchmark", "n_tasks"}
    if own_stream or cfg.benchmark.endswith("-digits"):
        unused |= {"data_dir", "download"}
    if cfg.val_fraction == 0:
        unused |= {"val_fraction", "evaluate_on"}
    return {k: v for k, v in settings.items() if k not in unused and v is not None and v != {}}


# ----------------------------------------------------------------------------- helpers


def _mask_logits(logits: Tensor, active: Tensor | None) -> Tensor:
    """Set the logits of inactive output units to -inf. ``active``: bool [n_outputs] or [B, n]."""
    return logits if active is None else logits.masked_fill(~active, float("-inf"))


def _masked_forward(model: nn.Module, batch: tuple[Tensor, Tensor, Tensor | None]) -> tuple:
    x, y, active = batch
    return _mask_logits(model(x), active), y


class _Batches:
    """Re-iterable ``(x_float, y, active_mask)`` batches over a fixed sample order; the mask is
    expanded to one row per sample ``[B, n_outputs]``, so that it splits along with the batch."""

    def __init__(
        self, x: Tensor, y: Tensor, active: Tensor | None, batch_size: int, order: Tensor
    ) -> None:
        self.x, self.y, self.active, self.batch_size, self.order = x, y, active, batch_size, order

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        for idx in self.order.split(self.batch_size):
            active = None if self.active is None else self.active.expand(len(idx), -1)
            yield to_float(self.x[idx]), self.y[idx], active


@torch.inference_mode()
def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, active: Tensor | None = None, batch_size: int = 1000
) -> float:
    """Accuracy (fraction) of ``model`` on inputs ``x`` [N, ...] with labels ``y`` [N]."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(y), batch_size):
        logits = _mask_logits(model(to_float(x[start : start + batch_size])), active)
        correct += int((logits.argmax(1) == y[start : start + batch_size]).sum())
    model.train(was_training)
    return correct / max(len(y), 1)


class _Masks:
    """Which output units are active, per scenario (see docs/design.md)."""

    def __init__(self, stream: TaskStream, device: torch.device) -> None:
        n = stream.n_outputs
        rows = torch.zeros(len(stream.tasks), n, dtype=torch.bool, device=device)
        for t, task in enumerate(stream.tasks):
            rows[t, task.classes] = True
        self.rows, self.scenario = rows, stream.scenario

    def seen(self, upto: int) -> Tensor:
        return self.rows[: upto + 1].any(0)

    def train(self, stage: int, task: int) -> Tensor | None:
        if self.scenario == "task":
            return self.rows[task]
        if self.scenario == "class":
            return self.seen(stage)
        return None

    def eval(self, stage: int, task: int) -> Tensor | None:
        if self.scenario == "class":
            return self.seen(max(stage, task))
        return self.train(stage, task)


def parameter_labels(model: nn.Module) -> dict[str, str]:
    """Each parameter's name mapped to its module path, module type, name and shape:
    ``"7.bias"`` -> ``"7: Linear.bias (768)"``."""
    labels = {}
    for path, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            shape = "×".join(map(str, p.shape))
            key = f"{path}.{name}" if path else name
            labels[key] = f"{path or '(model)'}: {type(module).__name__}.{name} ({shape})"
    return labels


def _importance_summary(
    importance: dict[str, Tensor], model: nn.Module, input_shape: Sequence[int], task: int
) -> dict[str, Any]:
    """Per-layer log10 histograms of an importance dict (each with a ``label`` a reader
    understands, see :func:`parameter_labels`), and per-pixel importance of a first Linear layer
    on images (summed over its output units)."""
    positive = torch.cat([v.flatten() for v in importance.values()])
    positive = positive[positive > 0]
    lo, hi = (
        (positive.min().log10().item(), positive.max().log10().item())
        if len(positive)
        else (-12.0, 0.0)
    )
    edges = torch.linspace(math.floor(lo), math.ceil(hi) + 1e-9, 41, dtype=torch.float64)
    layers = {}
    labels = parameter_labels(model)
    for name, value in importance.items():
        v = value.detach().double().flatten().cpu()
        logv = v[v > 0].log10()
        counts = torch.histogram(logv, bins=edges).hist if len(logv) else torch.zeros(40)
        layers[name] = {
            "label": labels.get(name, name),
            "log10_edges": edges.tolist(),
            "counts": [int(c) for c in counts],
            "zeros": int((v <= 0).sum()),
            "mean": float(v.mean()),
            "max": float(v.max()),
        }
    summary: dict[str, Any] = {"task": task, "layers": layers}
    first = next((m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)), None)
    if isinstance(first, nn.Linear) and len(input_shape) == 3:
        name = next(n for n, p in model.named_parameters() if p is first.weight)
        if name in importance:
            pixels = importance[name].detach().sum(0).reshape(tuple(input_shape)).sum(0)
            summary["input_importance"] = {
                "shape": list(pixels.shape),
                "values": [float(v) for v in pixels.flatten()],
            }
    return summary


def _versions() -> dict[str, str]:
    return {"ewc": __version__, "torch": torch.__version__, "python": platform.python_version()}


def _hardware(device: torch.device) -> dict[str, str]:
    """Where a run ran, to compare runs across machines: the CPU's architecture and torch's
    thread count, or the GPU's name and whether TF32 was allowed (PyTorch's default: off for
    matmuls, on for cuDNN convolutions), which changes results beyond float32 rounding."""
    if device.type != "cuda":
        return {
            "device": f"{device.type} ({platform.machine()})",
            "threads": str(torch.get_num_threads()),
        }
    on_off = {True: "on", False: "off"}
    return {
        "device": torch.cuda.get_device_name(device),
        "tf32": f"matmul {on_off[torch.backends.cuda.matmul.allow_tf32]}, "
        f"cudnn {on_off[torch.backends.cudnn.allow_tf32]}",
    }


def _subsample(task: Task, n: int | None, generator: torch.Generator) -> Task:
    if n is None or n >= len(task.train.y):
        return task
    keep = torch.randperm(len(task.train.y), generator=generator)[:n]
    return dataclasses.replace(task, train=task.train.subset(keep))


def _pair_to(pair: Any, device: torch.device) -> Any:
    return type(pair)(pair.x.to(device), pair.y.to(device))


# ----------------------------------------------------------------------------- the runner


def run(
    config: RunConfig,
    stream: TaskStream | None = None,
    model: nn.Module | None = None,
    progress: bool = False,
    on_task_end: Callable[[int, list[float]], None] | None = None,
    log_dir: str | os.PathLike[str] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Train the tasks of a stream in sequence and return a results dict (schema ewc.results/1).

    Args:
        config: the run's settings; unset fields take the benchmark's protocol.
        stream: a ready task stream (e.g. from :func:`ewc.data.streams.stream_from_tensors`);
            built from ``config.benchmark`` when omitted.
        model: your own ``nn.Module`` mapping a float batch ``[B, *input_shape]`` to logits
            ``[B, stream.n_outputs]``; built from ``config.model`` when omitted.
        progress: show progress bars (tqdm), one per phase: each task's training, its Fisher
            (or other importance), testing (:mod:`ewc.progress`).
        on_task_end: called as ``on_task_end(task_index, accuracies)`` after each task.
        log_dir: log the curves (loss, penalty, accuracy) there while training runs: a CSV file
            and TensorBoard event files (:mod:`ewc.logger`; the ``tensorboard`` extra).
        checkpoint: a file where the run's state is saved after each task (:mod:`ewc.checkpoint`);
            a run of the same config resumes from it, and ends as if never interrupted.

    Raises:
        DivergedError: the weights became NaN or infinite (the step or λ is too large).
    """
    cfg = resolve_config(config)
    settings = applicable_settings(cfg, own_model=model is not None, own_stream=stream is not None)
    # Filled by resolve_config; asserted for the type checker.
    assert cfg.model is not None and cfg.batch_size is not None and cfg.lr is not None
    t_start = time.perf_counter()
    device = distributed.setup(torch.device(cfg.device))
    generator = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if stream is None:
        stream = make_stream(
            cfg.benchmark,
            scenario=cfg.scenario,
            n_tasks=cfg.n_tasks,
            data_dir=cfg.data_dir,
            seed=cfg.seed,
            val_fraction=cfg.val_fraction,
            download=cfg.download,
        )
    tasks = [_subsample(t, cfg.max_train_samples, generator) for t in stream.tasks]
    train_sets = [_pair_to(t.train, device) for t in tasks]
    eval_sets = [_pair_to(t.val if cfg.evaluate_on == "val" else t.test, device) for t in tasks]
    if model is None:
        model = build_model(cfg.model, stream.input_shape, stream.n_outputs, cfg.hidden or ())
    model.to(device).train()
    trained = distributed.wrap(model)  # DDP under torchrun; evaluation and Fisher use `model`
    optimizer = _make_optimizer(cfg.optimizer, cfg.lr, model)
    masks = _Masks(stream, device)
    reg: Regularizer | None = None
    if cfg.strategy in REGULARIZED:
        reg = _make_regularizer(cfg, model)

    def accuracies(stage: int, limit: int | None = None, what: str = "") -> list[float]:
        sets = bars.iterate(eval_sets, what, len(eval_sets), "task") if what else eval_sets
        return [
            evaluate(model, e.x[:limit], e.y[:limit], masks.eval(stage, j))
            for j, e in enumerate(sets)
        ]

    bars = Progress(progress and distributed.is_main_process(), f"{cfg.strategy} seed {cfg.seed}")
    logger = ScalarLogger(log_dir) if log_dir is not None else None
    curves = Curves([t.name for t in tasks], penalty=reg is not None, logger=logger)

    timings = {"train_s": 0.0, "fisher_s": 0.0, "eval_s": 0.0}
    tic = time.perf_counter()
    random_init = accuracies(-1)
    timings["eval_s"] += time.perf_counter() - tic
    matrix: list[list[float]] = []
    importance: list[dict[str, Any]] = []
    step = 0
    steps_per_task = [
        _n_steps(
            cfg, len(s.y) if cfg.strategy != "joint" else sum(len(p.y) for p in train_sets[: t + 1])
        )
        for t, s in enumerate(train_sets)
    ]
    first = 0
    if checkpoint is not None:
        restored = checkpoints.resume(checkpoint, cfg.to_dict(), model, optimizer, reg, generator)
        if restored is not None:
            first, saved = restored
            random_init, matrix, importance, timings, step = (saved[k] for k in _RUN_STATE[:5])
            curves.restore(saved["curves"])  # and logged again: the log files hold it all
            t_start -= timings.pop("total_s")  # the time the interrupted process(es) took
    for t in range(first, len(tasks)):
        curves.task_boundaries.append(step)
        task = f"task {t + 1}/{len(tasks)}"
        bar = bars.bar(f"{task} {tasks[t].name} · training", steps_per_task[t], "step")
        x, y, ids = _stage_data(train_sets, t, joint=cfg.strategy == "joint")
        # Joint training in the task scenario mixes tasks in a batch: one mask row per sample.
        per_sample = cfg.strategy == "joint" and stream.scenario == "task"
        active_row = masks.train(t, t)
        every = cfg.eval_every or max(1, steps_per_task[t] // 10)
        tic = time.perf_counter()
        for idx in _batch_indices(len(y), cfg.batch_size, steps_per_task[t], generator, device):
            if step % every == 0:
                timings["train_s"] += time.perf_counter() - tic
                tic = time.perf_counter()
                curves.point(step, accuracies(t, cfg.curve_samples), penalty_value(reg))
                timings["eval_s"] += time.perf_counter() - tic
                tic = time.perf_counter()
            n_batch, idx = len(idx), distributed.shard(idx)
            active = masks.rows[ids[idx]] if per_sample else active_row
            logits = _mask_logits(trained(to_float(x[idx])), active)
            loss = _mean_loss(logits, y[idx], n_batch)
            curves.add_loss(loss)
            if reg is not None and cfg.penalty == "autograd":
                loss = loss + reg.penalty()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if reg is not None and cfg.penalty == "grad":
                reg.add_penalty_grad()
            optimizer.step()
            if reg is not None:
                if cfg.penalty == "proximal":
                    assert isinstance(reg, QuadraticRegularizer)  # checked by resolve_config
                    reg.proximal_step(cfg.lr)
                reg.after_step()
            step += 1
            bar.update()
        bar.close()
        timings["train_s"] += time.perf_counter() - tic
        _check_finite(model, tasks[t].name)
        if reg is not None and t < len(tasks) - 1:  # nothing follows the last task to protect
            tic = time.perf_counter()
            order = torch.randperm(len(train_sets[t].y), generator=generator).to(device)
            if cfg.fisher_samples is not None:
                order = order[: cfg.fisher_samples]
            order = distributed.shard(order)  # each rank its part; the Fisher is all-reduced
            batches = _Batches(train_sets[t].x, train_sets[t].y, active_row, 1024, order)
            what = f"{task} · {_importance_name(cfg)} on {len(order)} samples"
            reg.consolidate(bars.iterate(batches, what, math.ceil(len(order) / 1024), "batch"))
            timings["fisher_s"] += time.perf_counter() - tic
            importance.append(_importance_summary(reg.importance, model, stream.input_shape, t))
        tic = time.perf_counter()
        matrix.append(accuracies(t, what=f"{task} · testing on every task"))
        curves.point(step, accuracies(t, cfg.curve_samples), penalty_value(reg))
        timings["eval_s"] += time.perf_counter() - tic
        if checkpoint is not None and t < len(tasks) - 1:
            timings["total_s"] = time.perf_counter() - t_start
            state = (random_init, matrix, importance, timings, step, curves.to_dict())
            partial = dict(zip(_RUN_STATE, state, strict=True))
            checkpoints.save(
                checkpoint, cfg.to_dict(), t + 1, model, optimizer, reg, generator, partial
            )
        if on_task_end is not None:
            on_task_end(t, matrix[-1])
    if logger is not None:
        logger.close()
    timings["total_s"] = time.perf_counter() - t_start
    return {
        "schema": RESULTS_SCHEMA,
        "versions": _versions(),
        "hardware": _hardware(device),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": cfg.to_dict(),
        "settings": settings,
        "strategy": cfg.strategy,
        "benchmark": stream.name,
        "scenario": stream.scenario,
        "seed": cfg.seed,
        "task_names": [t.name for t in tasks],
        "accuracy_matrix": matrix,
        "random_init_accuracy": random_init,
        "metrics": compute_metrics(matrix, random_init),
        "curves": curves.to_dict(),
        "timings": timings,
        "importance": importance,
    }


#: The partial results that :func:`run` keeps in its checkpoints.
_RUN_STATE = ("random_init", "matrix", "importance", "timings", "step", "curves")


class DivergedError(ValueError):
    """Training made the model's weights NaN or infinite."""


def _check_finite(model: nn.Module, task: str) -> None:
    """Raise :class:`DivergedError` naming the parameters that are no longer finite."""
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise DivergedError(
            f"the weights became NaN or infinite while training task {task!r} (in "
            f"{', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): the step (lr) or the "
            "penalty (lam) is too large; lower it, or use penalty='proximal' with SGD"
        )


def _mean_loss(logits: Tensor, y: Tensor, n_batch: int) -> Tensor:
    """Cross-entropy averaged over the global batch of ``n_batch`` samples. Under DDP each rank
    holds a shard and DDP averages the ranks' gradients, so each rank's loss is its sum times
    ``world_size / n_batch``: exact for shards of any size, an empty one included."""
    if not distributed.active():
        return F.cross_entropy(logits, y)
    return F.cross_entropy(logits, y, reduction="sum") * (distributed.world_size() / n_batch)


def _n_steps(cfg: RunConfig, n_samples: int) -> int:
    if cfg.iterations is not None:
        return int(cfg.iterations)
    assert cfg.epochs is not None and cfg.batch_size is not None
    return max(1, math.ceil(cfg.epochs * n_samples / cfg.batch_size))


def _batch_indices(
    n: int, batch_size: int, n_steps: int, generator: torch.Generator, device: torch.device
) -> Iterator[Tensor]:
    """``n_steps`` batches of sample indices; reshuffled every epoch, the last batch of an epoch
    may be smaller."""
    done = 0
    while done < n_steps:
        for idx in torch.randperm(n, generator=generator).to(device).split(batch_size):
            if done == n_steps:
                return
            yield idx
            done += 1


def _stage_data(train_sets: list[Any], stage: int, joint: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Training inputs, labels and per-sample task ids for one stage (tasks 0..stage if joint)."""
    chosen = range(stage + 1) if joint else [stage]
    x = torch.cat([train_sets[j].x for j in chosen])
    y = torch.cat([train_sets[j].y for j in chosen])
    ids = torch.cat(
        [torch.full((len(train_sets[j].y),), j, dtype=torch.long, device=y.device) for j in chosen]
    )
    return x, y, ids


def _make_optimizer(name: str | None, lr: float, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # PyTorch's fused kernels update each parameter in one pass instead of about ten: a loop on
    # the Permuted MNIST MLP runs 1.13-1.27x slower with the default Adam on CPU
    # (docs/benchmarks.md). Same update rule.
    optimizer = torch.optim.SGD if name == "sgd" else torch.optim.Adam
    try:
        return optimizer(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):  # a torch, device or dtype without the fused kernels
        return optimizer(params, lr=lr)


def _make_regularizer(cfg: RunConfig, model: nn.Module) -> Regularizer:
    """The strategy's regularizer, given the RunConfig fields its registry entry names."""
    strategy = REGULARIZERS[cfg.strategy]
    kwargs: dict[str, Any] = {"lam": cfg.lam, **{o: getattr(cfg, o) for o in strategy.options}}
    if strategy.uses_data:
        kwargs["forward"] = _masked_forward
    return make_regularizer(cfg.strategy, model, **kwargs)


def _importance_name(cfg: RunConfig) -> str:
    """What ``consolidate`` computes from the task's data, for its progress bar."""
    named = {"mas": "MAS importance", "kfac": "K-FAC factors"}
    return named.get(cfg.strategy, f"{cfg.fisher} Fisher")


# ----------------------------------------------------------------------------- several runs


def result_path(out_dir: Path, strategy: str, seed: int) -> Path:
    """Where :func:`compare` writes the results of one strategy and seed."""
    return out_dir / f"{strategy}-seed{seed}.json"


def compare(
    config: RunConfig,
    strategies: Sequence[str],
    seeds: Sequence[int | str],
    out_dir: str | Path,
    progress: bool = False,
    resume: bool = True,
    log_dir: str | os.PathLike[str] | None = None,
) -> list[dict[str, Any]]:
    """Run several strategies on identical seeds and data; write one results file per run as it
    finishes (so an interrupted comparison keeps what it finished) and ``summary.csv``; with
    ``log_dir``, each run logs its curves to ``log_dir/<strategy>-seed<seed>/`` (see :func:`run`).

    Every run's settings and the output folder are checked before the first run starts: each
    strategy and seed once, no setting that none of the strategies reads. A setting read by
    some of the strategies only (``gamma``: online-ewc) is left at its default for the others.
    With ``resume``, a run whose results file exists with the same config is read, not rerun.
    """
    if not strategies or not seeds:
        raise ConfigError("compare needs at least one strategy and one seed")
    for s in strategies:
        _choice("strategy", s, STRATEGIES)
    unused = unused_settings(config, strategies)
    if unused:
        raise ConfigError(f"{unused[0]}; remove it or add a strategy that uses it")
    configs = [
        resolve_config(dataclasses.replace(config, **_run_update(s, seed)))
        for seed in seeds
        for s in strategies
    ]
    runs = [(c.strategy, c.seed) for c in configs]
    twice = next((r for i, r in enumerate(runs) if r in runs[:i]), None)
    if twice is not None:
        raise ConfigError(
            f"strategy {twice[0]!r} with seed {twice[1]} is given twice; it would count as "
            "two seeds. List each strategy and each seed once."
        )
    out = check_output(out_dir, folder=True)
    results = [
        run_and_save(c, result_path(out, c.strategy, c.seed), progress, resume, _logs(log_dir, c))
        for c in configs
    ]
    write_summary_csv(results, out / "summary.csv")
    return results


def _run_update(strategy: str, seed: int | str) -> dict[str, Any]:
    """The fields of one run of :func:`compare`: its strategy and seed, and the defaults of the
    settings that ``strategy`` does not read (:data:`STRATEGY_SETTINGS`)."""
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    unread = {n: defaults[n] for n, users in STRATEGY_SETTINGS.items() if strategy not in users}
    return {**unread, "strategy": strategy, "seed": seed}


def _logs(log_dir: str | os.PathLike[str] | None, cfg: RunConfig) -> Path | None:
    """Where one run of a comparison logs its curves: ``log_dir/<strategy>-seed<seed>``."""
    return None if log_dir is None else Path(log_dir) / f"{cfg.strategy}-seed{cfg.seed}"


def run_and_save(
    cfg: RunConfig,
    path: str | Path,
    progress: bool = False,
    resume: bool = True,
    log_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """The results of ``cfg``: read from ``path`` (a results JSON) if they are there with this
    config and ``resume``, else run (logging to ``log_dir``, if given) and saved there. The run
    saves a checkpoint after each task next to ``path`` (:func:`ewc.checkpoint.checkpoint_path`),
    resumes from it with ``resume``, and removes it once the results are saved."""
    ckpt = checkpoints.checkpoint_path(path)
    result = _load_matching(Path(path), cfg) if resume else None
    if result is None:
        if not resume:
            checkpoints.remove_checkpoint(ckpt)
        result = run(cfg, progress=progress, log_dir=log_dir, checkpoint=ckpt)
        save_results(result, path)
    checkpoints.remove_checkpoint(ckpt)
    return result


def _load_matching(path: Path, cfg: RunConfig) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        previous = load_results(path)
    except ValueError:
        return None
    return previous if previous.get("config") == cfg.to_dict() else None


def _file_name(value: float) -> str:
    """``value`` in a file name: short (``1000``, ``0.001``) where that reads back exactly, else
    Python's shortest exact form, so two distinct values never share a file."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


#: The settings :func:`sweep` can choose: those that change what is learned.
SWEEPABLE = ("lam", "gamma", "xi", "lr", "epochs", "iterations", "batch_size", "fisher_samples")


def sweep(
    config: RunConfig,
    grid: Sequence[Any],
    out_dir: str | Path,
    param: str = "lam",
    val_fraction: float = 0.1,
    progress: bool = False,
    resume: bool = True,
) -> dict[str, Any]:
    """Choose ``param`` (λ by default) on a validation split held out of the training data, then
    rerun with the chosen value and report test accuracy. Never looks at test data to choose.

    Writes ``out_dir/sweep.json`` (schema ewc.sweep/1), ``out_dir/<param>=<value>.json`` per grid
    point (validation results; distinct values never share a file) and ``out_dir/final.json``
    (test results at the chosen value). Every grid point's settings and the output folder are
    checked before the first run. A grid point whose run fails (a diverged model) is recorded
    with its ``error`` and skipped. With ``resume``, a point whose results file exists with the
    same config is read, not rerun.
    """
    if param not in SWEEPABLE:
        raise ConfigError(f"cannot sweep {param!r}; choose one of {', '.join(SWEEPABLE)}")
    if not grid:
        raise ConfigError(f"the {param} grid is empty; give values such as 1e2,1e3,1e4")
    held_out = dataclasses.replace(config, val_fraction=val_fraction, evaluate_on="val")
    configs = [resolve_config(dataclasses.replace(held_out, **{param: v})) for v in grid]
    values = [getattr(c, param) for c in configs]
    twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
    if twice is not None:
        raise ConfigError(f"{param}={twice!r} is in the grid twice; list each value once")
    resolve_config(dataclasses.replace(config, **{param: values[0]}))  # the final run's settings
    out = check_output(out_dir, folder=True)
    points: list[dict[str, Any]] = []
    for cfg, value in zip(configs, values, strict=True):
        try:
            result = run_and_save(cfg, out / f"{param}={_file_name(value)}.json", progress, resume)
        except ConfigError:  # a setting that the data refuse (e.g. too few samples to hold out)
            raise
        except ValueError as e:  # e.g. a penalty too stiff for the step size: NaN weights
            points.append({"value": value, "error": str(e)})
            continue
        last = result["accuracy_matrix"][-1]
        points.append(
            {
                "value": value,
                "val_acc": result["metrics"]["acc"],
                "val_old_acc": sum(last[:-1]) / max(len(last) - 1, 1),
                "val_new_acc": last[-1],
            }
        )
    finished = [p for p in points if "error" not in p]
    if not finished:
        raise ConfigError(f"every {param} in the grid failed: {points[0]['error']}")
    chosen = max(finished, key=lambda p: p["val_acc"])["value"]
    final_cfg = resolve_config(dataclasses.replace(config, **{param: chosen}))
    final_path = out / "final.json"
    run_and_save(final_cfg, final_path, progress, resume)
    summary = {
        "schema": SWEEP_SCHEMA,
        "param": param,
        "strategy": config.strategy,
        "benchmark": config.benchmark,
        "grid": values,
        "points": points,
        "chosen": chosen,
        "final": str(final_path),
        "versions": _versions(),
    }
    save_results(summary, out / "sweep.json")
    return summary
