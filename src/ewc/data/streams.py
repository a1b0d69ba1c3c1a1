"""Task streams: sequences of classification tasks for continual learning.

A :class:`TaskStream` is a list of :class:`Task` plus the scenario and the width of the
model's output layer. Targets are already remapped to output units, and each task's
``classes`` lists the units its labels use. Scenarios (van de Ven & Tolias, 2019):

- ``"task"``: the task identity is given; the runner masks the outputs to the task's
  ``classes`` in training and evaluation (multi-head).
- ``"domain"``: one shared head; labels are the index within the task's own label set
  (split benchmarks: 0/1; permuted/rotated: the digit).
- ``"class"``: one growing head; training on task t uses the classes of tasks 0..t.

Label remapping, for benchmarks and :func:`stream_from_tensors` alike: with ``"domain"``
each task's sorted labels become 0..k-1. With ``"task"`` and ``"class"``, labels are kept
when the tasks' label sets are disjoint (split benchmarks: the digits themselves,
``n_outputs`` 10); otherwise task t gets its own block of units after those of tasks
0..t-1 (permuted/rotated MNIST: task t uses units 10t..10t+9, ``n_outputs`` 10·T).

Benchmarks (:data:`BENCHMARKS`, built by :func:`make_stream`) precompute their inputs once
as uint8, so a batch is a plain index gather. Everything random comes from ``seed``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ewc.config import ConfigError, did_you_mean
from ewc.data.datasets import TensorPair, load_dataset
from ewc.data.sources import find_datasets

__all__ = [
    "BENCHMARKS",
    "SCENARIOS",
    "Benchmark",
    "Task",
    "TaskStream",
    "make_stream",
    "rotation_angles",
    "stream_from_tensors",
]

SCENARIOS = ("task", "domain", "class")
_PERMUTATION, _VALIDATION = 0, 1  # purposes of per-task random streams


@dataclass
class Task:
    """One task: its data, and the output units (``classes``) its targets use.

    ``train``/``test``/``val``: ``x`` uint8 (or float) ``[N, C, H, W]`` or ``[N, D]``,
    ``y`` int64 ``[N]`` already remapped to output units. ``val`` is held out of the
    training data when the stream was built with ``val_fraction > 0``, else None.
    """

    name: str
    train: TensorPair
    test: TensorPair
    classes: list[int]
    val: TensorPair | None = None


@dataclass
class TaskStream:
    """Tasks in training order, the scenario, the output width and the per-sample shape."""

    name: str
    scenario: str
    tasks: list[Task]
    n_outputs: int
    input_shape: tuple[int, ...]

    def __post_init__(self) -> None:
        """Refuse classes outside the output width, and NaN or infinite inputs (float inputs
        are read once here; uint8 ones cannot hold them)."""
        _check_scenario(self.scenario, SCENARIOS)
        for task in self.tasks:
            bad = [c for c in task.classes if not 0 <= c < self.n_outputs]
            if bad:
                raise ValueError(
                    f"Task {task.name!r} uses classes {bad} outside 0..{self.n_outputs - 1}; "
                    "raise n_outputs or fix the task's classes."
                )
            for split in ("train", "val", "test"):
                pair = getattr(task, split)
                if pair is None or not pair.x.is_floating_point():
                    continue
                n_bad = int((~torch.isfinite(pair.x)).sum())
                if n_bad:
                    raise ValueError(
                        f"Task {task.name!r}: its {split} inputs hold {n_bad} NaN or infinite "
                        "values; clean the data (torch.isfinite(x).all()) or drop those samples."
                    )

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    @property
    def task_names(self) -> list[str]:
        return [task.name for task in self.tasks]


@dataclass(frozen=True)
class _RawTask:
    """A task before remapping: original labels."""

    name: str
    train: TensorPair
    test: TensorPair


Builder = Callable[[int, int, "str | Path | None", bool], list[_RawTask]]
"""``build(n_tasks, seed, data_dir, download)`` -> tasks with their original labels."""


@dataclass(frozen=True)
class Benchmark:
    """A registered benchmark: how to build it and which settings it allows."""

    build: Builder
    description: str
    default_n_tasks: int
    max_n_tasks: int | None = None
    default_scenario: str = "domain"
    scenarios: tuple[str, ...] = SCENARIOS


# ----------------------------------------------------------------------------- randomness


def _generator(seed: int, task: int, purpose: int) -> torch.Generator:
    """An independent CPU generator for (seed, task, purpose): stable whatever else changes."""
    state = np.random.SeedSequence([seed, task, purpose]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0]) >> 1)


# ----------------------------------------------------------------------------- transforms


def _select(pair: TensorPair, labels: Sequence[int]) -> TensorPair:
    return pair.subset(torch.isin(pair.y, torch.tensor(labels)))


def _permute(pair: TensorPair, perm: torch.Tensor) -> TensorPair:
    """Shuffle the pixels of every sample by the same permutation of the flattened input."""
    return TensorPair(pair.x.flatten(1)[:, perm].reshape(pair.x.shape), pair.y)


def _pad(pair: TensorPair, pad: int) -> TensorPair:
    """Images ``[N, C, H, W]`` with a border of ``pad`` zero pixels on every side."""
    return pair if pad == 0 else TensorPair(F.pad(pair.x, (pad,) * 4), pair.y)


def _rotate(pair: TensorPair, degrees: float, chunk: int = 8192) -> TensorPair:
    """Rotate uint8 images ``[N, C, H, W]`` counter-clockwise (bilinear, zero fill)."""
    if degrees % 360 == 0:
        return pair
    a = math.radians(degrees)
    theta = torch.tensor([[[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]]])
    grid = F.affine_grid(theta, [1, *pair.x.shape[1:]], align_corners=False)
    out = torch.empty_like(pair.x)
    for start in range(0, len(pair), chunk):
        x = pair.x[start : start + chunk].to(torch.float32)
        rotated = F.grid_sample(x, grid.expand(len(x), -1, -1, -1), align_corners=False)
        out[start : start + chunk] = rotated.round_().clamp_(0, 255).to(torch.uint8)
    return TensorPair(out, pair.y)


# ----------------------------------------------------------------------------- builders


def _splits(dataset: str, data_dir: str | Path | None, download: bool) -> list[TensorPair]:
    return [load_dataset(dataset, split, data_dir, download) for split in ("train", "test")]


def _build_split(
    dataset: str, n_tasks: int, seed: int, data_dir: str | Path | None, download: bool
) -> list[_RawTask]:
    """Task t: classes 2t and 2t+1 (0/1, 2/3, 4/5, 6/7, 8/9)."""
    train, test = _splits(dataset, data_dir, download)
    groups = [(2 * t, 2 * t + 1) for t in range(n_tasks)]
    return [_RawTask(f"{a}/{b}", _select(train, (a, b)), _select(test, (a, b))) for a, b in groups]


def _build_permuted(
    dataset: str,
    n_tasks: int,
    seed: int,
    data_dir: str | Path | None,
    download: bool,
    pad: int = 0,
) -> list[_RawTask]:
    """Task 1 is the unpermuted dataset; task t > 1 applies a fixed random pixel permutation.
    With ``pad``, the images first get a border of ``pad`` zero pixels, so the permutation
    scatters each digit over the larger image (van de Ven & Tolias 2019 pad MNIST to 32×32)."""
    train, test = (_pad(pair, pad) for pair in _splits(dataset, data_dir, download))
    n_pixels = math.prod(train.x.shape[1:])
    tasks = [_RawTask("permuted-1", train, test)]
    for t in range(1, n_tasks):
        perm = torch.randperm(n_pixels, generator=_generator(seed, t, _PERMUTATION))
        tasks.append(_RawTask(f"permuted-{t + 1}", _permute(train, perm), _permute(test, perm)))
    return tasks


def rotation_angles(n_tasks: int) -> list[float]:
    """Rotated benchmarks' angles in degrees: ``180 * t / n_tasks`` (5 tasks: 0, 36, ..., 144)."""
    return [180.0 * t / n_tasks for t in range(n_tasks)]


def _build_rotated(
    dataset: str, n_tasks: int, seed: int, data_dir: str | Path | None, download: bool
) -> list[_RawTask]:
    train, test = _splits(dataset, data_dir, download)
    return [
        _RawTask(f"rotated-{angle:g}", _rotate(train, angle), _rotate(test, angle))
        for angle in rotation_angles(n_tasks)
    ]


def _build_sequence(
    datasets: Sequence[str], n_tasks: int, seed: int, data_dir: str | Path | None, download: bool
) -> list[_RawTask]:
    """One task per dataset, in order; every missing dataset is named at once."""
    find_datasets(datasets[:n_tasks], data_dir, download)
    return [_RawTask(name, *_splits(name, data_dir, download)) for name in datasets[:n_tasks]]


BENCHMARKS: dict[str, Benchmark] = {
    "fashion-mnist-to-mnist": Benchmark(
        functools.partial(_build_sequence, ("fashion-mnist", "mnist")),
        "Fashion-MNIST then MNIST (the seed experiment); domain: one shared 10-way head",
        default_n_tasks=2,
        max_n_tasks=2,
    ),
    **{
        f"permuted-{data}": Benchmark(
            functools.partial(_build_permuted, data),
            f"{data} with a fixed random pixel permutation per task (task 1 unpermuted)",
            default_n_tasks=n,
        )
        for data, n in (("mnist", 10), ("digits", 5))
    },
    "permuted-mnist-32": Benchmark(
        functools.partial(_build_permuted, "mnist", pad=2),
        "mnist zero-padded to 32x32, then a fixed random permutation of all 1024 pixels per task "
        "(task 1 unpermuted): van de Ven & Tolias 2019's input",
        default_n_tasks=10,
    ),
    **{
        f"rotated-{data}": Benchmark(
            functools.partial(_build_rotated, data),
            f"{data} rotated by 180·t/T degrees for task t = 0..T-1",
            default_n_tasks=5,
        )
        for data in ("mnist", "digits")
    },
    **{
        f"split-{data}": Benchmark(
            functools.partial(_build_split, data),
            f"{data} split into 5 tasks of 2 classes (0/1, 2/3, 4/5, 6/7, 8/9)",
            default_n_tasks=5,
            max_n_tasks=5,
            default_scenario="task",
        )
        for data in ("mnist", "fashion-mnist", "digits")
    },
}
"""Registered benchmarks. ``*-digits`` use scikit-learn's 8x8 digits: offline and fast
(the demo's fallback is ``permuted-digits`` with ``n_tasks=2``, an offline analogue of
``fashion-mnist-to-mnist``)."""


# ----------------------------------------------------------------------------- assembly


def _check_scenario(scenario: str, allowed: Sequence[str]) -> None:
    if scenario not in allowed:
        raise ValueError(f"Unknown scenario {scenario!r}; choose one of {list(allowed)}.")


def _hold_out(
    pair: TensorPair, fraction: float, generator: torch.Generator
) -> tuple[TensorPair, TensorPair | None]:
    """Split ``pair`` into (train, val) with ``round(fraction * N)`` random samples in val."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {fraction}.")
    n_val = round(fraction * len(pair))
    if fraction > 0 and not 0 < n_val < len(pair):
        raise ConfigError(
            f"val_fraction: {fraction:g} of {len(pair)} training samples holds out {n_val}; "
            "choose a fraction that leaves at least one sample for validation and one for training"
        )
    if n_val == 0:
        return pair, None
    held = torch.zeros(len(pair), dtype=torch.bool)
    held[torch.randperm(len(pair), generator=generator)[:n_val]] = True
    return pair.subset(~held), pair.subset(held)


def _labels(task: _RawTask) -> list[int]:
    """Sorted distinct labels of a task's train and test data."""
    y = torch.cat([task.train.y, task.test.y])
    if len(y) and y.min() < 0:
        raise ValueError(f"Task {task.name!r}: labels must be non-negative, got {y.min()}.")
    return torch.bincount(y).nonzero().flatten().tolist()


def _remap(pair: TensorPair, lut: torch.Tensor) -> TensorPair:
    return TensorPair(pair.x, lut[pair.y])


def _assemble(
    name: str, raw: Sequence[_RawTask], scenario: str, seed: int, val_fraction: float
) -> TaskStream:
    """Hold out validation data, remap labels to output units (module docstring), build."""
    if not raw:
        raise ValueError("A task stream needs at least one task.")
    shapes = {tuple(task.train.x.shape[1:]) for task in raw} | {
        tuple(task.test.x.shape[1:]) for task in raw
    }
    if len(shapes) != 1:
        raise ValueError(f"All tasks must share one input shape; got {sorted(shapes)}.")
    label_sets = [_labels(task) for task in raw]
    units, n_outputs = _units(label_sets, scenario)
    tasks = []
    for t, (task, labels, task_units) in enumerate(zip(raw, label_sets, units, strict=True)):
        lut = torch.full((max(labels, default=0) + 1,), -1, dtype=torch.int64)
        lut[labels] = torch.tensor(task_units, dtype=torch.int64)
        train, val = _hold_out(task.train, val_fraction, _generator(seed, t, _VALIDATION))
        tasks.append(
            Task(
                name=task.name,
                train=_remap(train, lut),
                test=_remap(task.test, lut),
                classes=sorted(task_units),
                val=_remap(val, lut) if val is not None else None,
            )
        )
    return TaskStream(name, scenario, tasks, n_outputs, shapes.pop())


def _units(label_sets: list[list[int]], scenario: str) -> tuple[list[list[int]], int]:
    """Output unit of each task's (sorted) labels, and the number of outputs."""
    if scenario == "domain":
        units = [list(range(len(labels))) for labels in label_sets]
        return units, max(len(labels) for labels in label_sets)
    if sum(map(len, label_sets)) == len(set().union(*label_sets)):  # disjoint: keep labels
        return label_sets, max(max(labels) for labels in label_sets if labels) + 1
    offsets = np.cumsum([0] + [len(labels) for labels in label_sets]).tolist()
    units = [list(range(offsets[t], offsets[t + 1])) for t in range(len(label_sets))]
    return units, offsets[-1]


def check_benchmark(benchmark: str) -> None:
    """Raise :class:`ConfigError` naming the closest benchmark unless ``benchmark`` is one of
    :data:`BENCHMARKS`."""
    if benchmark not in BENCHMARKS:
        raise ConfigError(
            f"Unknown benchmark {benchmark!r}{did_you_mean(benchmark, BENCHMARKS)}; choose one "
            f"of {sorted(BENCHMARKS)}."
        )


def make_stream(
    benchmark: str,
    scenario: str | None = None,
    n_tasks: int | None = None,
    data_dir: str | Path | None = None,
    seed: int = 0,
    val_fraction: float = 0.0,
    download: bool = True,
) -> TaskStream:
    """Build a registered benchmark (see :data:`BENCHMARKS`).

    Parameters
    ----------
    benchmark : ``fashion-mnist-to-mnist`` (2 tasks, default scenario domain),
        ``permuted-mnist`` (10 tasks; task 1 is the UNPERMUTED MNIST, as in van de Ven et al.;
        each later task a pixel permutation drawn from ``seed``), ``rotated-mnist`` (5 tasks,
        rotated counter-clockwise by 0, 36, 72, 108, 144 degrees: ``180·t/T``),
        ``split-mnist`` / ``split-fashion-mnist`` (5 tasks of 2 classes; default scenario
        task), and the offline ``permuted-digits`` (5 tasks), ``rotated-digits``,
        ``split-digits`` on scikit-learn's 8x8 digits.
    scenario : ``"task"``, ``"domain"`` or ``"class"``; default per benchmark.
    n_tasks : number of tasks; default per benchmark (split: at most 5).
    data_dir : where the MNIST-style files are (see :func:`ewc.data.sources.find_dataset`).
    seed : seeds permutations and validation splits; same seed, same stream.
    val_fraction : fraction of each task's training set held out as ``task.val`` (for
        choosing hyperparameters); test data is never touched.
    download : allow downloading missing files.
    """
    check_benchmark(benchmark)
    spec = BENCHMARKS[benchmark]
    scenario = spec.default_scenario if scenario is None else scenario
    _check_scenario(scenario, spec.scenarios)
    n_tasks = spec.default_n_tasks if n_tasks is None else n_tasks
    limit = spec.max_n_tasks
    if isinstance(n_tasks, bool) or not isinstance(n_tasks, int):
        raise ValueError(f"{benchmark}: n_tasks must be an int, got {n_tasks!r}.")
    if not (n_tasks >= 1 and (limit is None or n_tasks <= limit)):
        bound = f"1..{limit}" if limit is not None else ">= 1"
        raise ValueError(f"{benchmark}: n_tasks must be {bound}, got {n_tasks}.")
    raw = spec.build(n_tasks, seed, data_dir, download)
    return _assemble(benchmark, raw, scenario, seed, val_fraction)


# ----------------------------------------------------------------------------- user data


def _as_pair(data: Any) -> TensorPair:
    """A TensorPair from a TensorPair, an ``(x, y)`` pair of tensors/arrays, or a Dataset."""
    if isinstance(data, TensorPair):
        return data
    if isinstance(data, Dataset):
        tensors = getattr(data, "tensors", None)  # TensorDataset: no per-sample copy
        if tensors is not None and len(tensors) == 2:
            x, y = tensors
        else:
            samples = [data[i] for i in range(len(data))]  # type: ignore[arg-type]
            x = torch.stack([torch.as_tensor(s[0]) for s in samples])
            y = torch.as_tensor([int(s[1]) for s in samples])
    elif isinstance(data, Sequence) and len(data) == 2:
        x, y = data
    else:
        raise TypeError(
            f"Expected a TensorPair, an (x, y) pair or a torch Dataset; got {type(data).__name__}."
        )
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    if y.is_floating_point() or y.is_complex():
        raise TypeError(f"Labels must be integers, got {y.dtype}.")
    return TensorPair(x, y.to(torch.int64))


def stream_from_tensors(
    tasks: Sequence[Any],
    scenario: str = "task",
    name: str = "custom",
    *,
    task_names: Sequence[str] | None = None,
    seed: int = 0,
    val_fraction: float = 0.0,
) -> TaskStream:
    """Build a stream from your own data; the documented way to plug in other datasets.

    Each element of ``tasks`` is one of

    - ``(train_x, train_y, test_x, test_y)``: tensors or arrays, ``x [N, ...]``, integer ``y [N]``;
    - ``(train, test)``: each a :class:`TensorPair`, an ``(x, y)`` pair, or a torch
      ``Dataset`` yielding ``(x, y)`` samples. Datasets are materialised into tensors once
      (a ``TensorDataset`` is used as is; others are read sample by sample, then stacked);
    - a :class:`Task`, used as given (targets already remapped; ``classes`` set): the
      output width is the largest class + 1.

    Labels of tuple tasks are remapped as described in the module docstring for
    ``scenario``. Keep images as uint8 0..255 (converted on batch gather) or pass floats.
    ``val_fraction`` holds out part of each training set as ``task.val``, seeded by ``seed``.
    """
    _check_scenario(scenario, SCENARIOS)
    names = list(task_names) if task_names is not None else []
    if names and len(names) != len(tasks):
        raise ValueError(f"Got {len(names)} task_names for {len(tasks)} tasks.")
    if tasks and all(isinstance(task, Task) for task in tasks):
        return _stream_of_tasks(list(tasks), scenario, name, names, seed, val_fraction)
    raw = []
    for t, task in enumerate(tasks):
        if isinstance(task, Task) or not isinstance(task, Sequence) or len(task) not in (2, 4):
            raise TypeError(
                f"tasks[{t}]: expected (train_x, train_y, test_x, test_y) or (train, test), or "
                f"Task objects for every task; got {type(task).__name__}."
            )
        train, test = (task[:2], task[2:]) if len(task) == 4 else task
        raw.append(
            _RawTask(names[t] if names else f"task-{t + 1}", _as_pair(train), _as_pair(test))
        )
    return _assemble(name, raw, scenario, seed, val_fraction)


def _stream_of_tasks(
    tasks: list[Task], scenario: str, name: str, names: list[str], seed: int, val_fraction: float
) -> TaskStream:
    """A stream of ready Tasks; held-out validation split off those without ``val``."""
    out = []
    for t, task in enumerate(tasks):
        train, val = task.train, task.val
        if val is None:
            train, val = _hold_out(train, val_fraction, _generator(seed, t, _VALIDATION))
        out.append(Task(names[t] if names else task.name, train, task.test, task.classes, val))
    n_outputs = max(max(task.classes, default=0) for task in tasks) + 1
    return TaskStream(name, scenario, out, n_outputs, tuple(tasks[0].train.x.shape[1:]))
