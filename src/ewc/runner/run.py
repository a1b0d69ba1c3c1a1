"""The run across tasks: :func:`run` prepares the data, model, optimizer and regularizer, then for
each task trains, consolidates, tests and saves a checkpoint, and returns a results dict
(schema ewc.results/1). Each phase is one method of :class:`_Run`."""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ewc import __version__, distributed, fsdp
from ewc import checkpoint as checkpoints
from ewc.config import Range
from ewc.curves import Curves, penalty_value
from ewc.data.streams import Task, TaskStream, make_stream
from ewc.logger import ScalarLogger
from ewc.metrics import compute_metrics
from ewc.models import build_model
from ewc.outputs import check_paths
from ewc.progress import Progress
from ewc.readback import mismatch
from ewc.regularizers import Regularizer
from ewc.results import RESULTS_SCHEMA, RESULTS_SPEC
from ewc.runner.checks import check_arguments, check_model, check_tasks
from ewc.runner.config import (
    REGULARIZED,
    RunConfig,
    applicable_settings,
    build_regularizer,
    resolve_config,
)
from ewc.runner.importance import importance_summary, summary_problem
from ewc.runner.masks import Masks
from ewc.runner.task import (
    Batches,
    Divergence,
    TrainStep,
    batch_indices,
    evaluate,
    make_optimizer,
    n_steps,
    stage_data,
)
from ewc.tables import setting_text

#: The partial results that :func:`run` keeps in its checkpoints.
_RUN_STATE = ("random_init", "matrix", "importance", "timings", "step", "curves")
#: The schema of the partial results in a checkpoint (spec of :func:`ewc.readback.mismatch`).
_PARTIAL_SPEC: dict[str, Any] = {
    "random_init": RESULTS_SPEC["random_init_accuracy"],
    "matrix": RESULTS_SPEC["accuracy_matrix"],
    "importance": RESULTS_SPEC["importance?"],
    "timings": {"train_s": Range(0), "fisher_s": Range(0), "eval_s": Range(0), "total_s": Range(0)},
    "step": int,
    "curves": {k.replace("loss?", "loss"): v for k, v in RESULTS_SPEC["curves?"].items()},
}


def _consolidation_batch(device: torch.device) -> int:
    """Samples per batch when the regularizer reads a task's data at consolidation: 128 on a
    CPU, where larger activations (over glibc's 32 MB mmap threshold) are page-faulted in anew
    for every backward pass (the seed CNN's exact Fisher took 1.8x as long in batches of 1024),
    1024 on an accelerator. The sums do not depend on it beyond rounding."""
    return 128 if device.type == "cpu" else 1024


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
        DivergedError: the loss exploded (a mean cross-entropy over ``LOSS_LIMIT`` times a
            uniform guess's) or the weights blew up or became NaN or infinite (the step or λ is
            too large); checked at each curve point and at the end of each task.
    """
    check_arguments(config, stream, model)
    check_paths([] if checkpoint is None else [checkpoint], [] if log_dir is None else [log_dir])
    cfg = resolve_config(config, own_stream=stream is not None)
    settings = applicable_settings(cfg, own_model=model is not None, own_stream=stream is not None)
    if checkpoint is not None and cfg.parallel == "fsdp" and distributed.launched():
        raise ValueError(
            "checkpoint= is not supported with parallel='fsdp' yet: the run's "
            "checkpoint is one file written by rank 0, and FSDP's model, optimizer and "
            "regularizer states are sharded over the ranks. Run without a checkpoint, or with "
            "parallel='ddp'."
        )
    if stream is not None:
        _say_protocol(config, cfg, stream.name, settings)
    state = _Run(cfg, stream, model, progress, log_dir)
    first = state.resume(checkpoint)
    if first:
        n = len(state.tasks)
        distributed.note(f"resuming {checkpoint} after task {first} of {n} (--fresh starts over)")
    for t in range(first, len(state.tasks)):
        state.train(t)
        state.consolidate(t)
        state.test(t)
        state.save(t, checkpoint)
        if on_task_end is not None:
            on_task_end(t, state.matrix[-1])
    return state.results(settings)


def _say_protocol(given: RunConfig, cfg: RunConfig, stream: str, settings: dict[str, Any]) -> None:
    """Note which protocol filled the settings left unset for a stream of one's own (a
    benchmark's protocol is made for that benchmark's data, not for yours)."""
    filled = {k: v for k, v in settings.items() if getattr(given, k) is None and k in _PROTOCOL}
    if not filled:
        return
    source = (
        "the generic protocol (benchmark=NAME takes that benchmark's instead)"
        if cfg.benchmark is None
        else f"the {cfg.benchmark} protocol"
    )
    values = ", ".join(f"{k} {setting_text(v)}" for k, v in filled.items())
    distributed.note(f"your stream {stream!r}: settings left unset come from {source}: {values}")


#: The settings a protocol fills (:data:`~ewc.runner.protocols.BENCHMARK_DEFAULTS`).
_PROTOCOL = ("model", "hidden", "epochs", "iterations", "batch_size", "lr", "optimizer", "lam")


class _Run:
    """A run in progress: what it trains (data, model, optimizer, regularizer) and what it has
    measured so far (the accuracy matrix, curves, importance summaries, timings)."""

    def __init__(
        self,
        cfg: RunConfig,
        stream: TaskStream | None,
        model: nn.Module | None,
        progress: bool,
        log_dir: str | os.PathLike[str] | None,
    ) -> None:
        # Filled by resolve_config; asserted for the type checker.
        assert cfg.model is not None and cfg.batch_size is not None and cfg.lr is not None
        self.cfg = cfg
        self.t_start = time.perf_counter()
        self.device = device = distributed.setup(torch.device(cfg.device))
        self.generator = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        if stream is None:
            assert cfg.benchmark is not None  # filled by resolve_config without a stream
            stream = make_stream(
                cfg.benchmark,
                scenario=cfg.scenario,
                n_tasks=cfg.n_tasks,
                data_dir=cfg.data_dir,
                seed=cfg.seed,
                val_fraction=cfg.val_fraction,
                download=cfg.download,
            )
        self.stream = stream
        self.tasks = [_subsample(t, cfg.max_train_samples, self.generator) for t in stream.tasks]
        self.train_sets = [_pair_to(t.train, device) for t in self.tasks]
        self.eval_sets = [
            _pair_to(t.val if cfg.evaluate_on == "val" else t.test, device) for t in self.tasks
        ]
        if model is None:
            model = build_model(cfg.model, stream.input_shape, stream.n_outputs, cfg.hidden or ())
        self.model = model
        model.to(device).train()
        check_tasks(self.tasks, self.eval_sets, cfg.evaluate_on)
        check_model(model, stream, self.train_sets[0].x[:2])
        # DDP (or FSDP, sharding `model` in place) under torchrun; evaluation and Fisher use
        # `model`. The optimizer and the regularizer come after: FSDP replaces the parameters.
        trained = distributed.wrap(model, cfg.parallel)
        self.divergence = Divergence(model, stream.n_outputs)
        self.optimizer = make_optimizer(cfg.optimizer, cfg.lr, model)
        self.masks = Masks(stream, device)
        self.reg: Regularizer | None = None
        if cfg.strategy in REGULARIZED:
            self.reg = build_regularizer(cfg, model)
        self.step_fn = TrainStep(trained, self.optimizer, self.reg, cfg.penalty, cfg.lr)
        main = progress and distributed.is_main_process()
        self.bars = Progress(main, f"{cfg.strategy} seed {cfg.seed}")
        if log_dir is not None and distributed.is_main_process():
            _remove_events(log_dir)
        self.logger = ScalarLogger(log_dir) if log_dir is not None else None
        self.curves = Curves(
            [t.name for t in self.tasks], penalty=self.reg is not None, logger=self.logger
        )
        self.timings = {"train_s": 0.0, "fisher_s": 0.0, "eval_s": 0.0}
        tic = time.perf_counter()
        self.random_init = self.accuracies(-1)
        self.timings["eval_s"] += time.perf_counter() - tic
        self.matrix: list[list[float]] = []
        self.importance: list[dict[str, Any]] = []
        self.step = 0
        joint = cfg.strategy == "joint"
        self.steps_per_task = [
            n_steps(cfg, sum(len(p.y) for p in self.train_sets[: t + 1]) if joint else len(s.y))
            for t, s in enumerate(self.train_sets)
        ]

    def accuracies(self, stage: int, limit: int | None = None, what: str = "") -> list[float]:
        """Accuracy on every task's evaluation set after ``stage`` (-1: before training), on
        its first ``limit`` samples (all by default), with a progress bar titled ``what``."""
        sets: Iterable[Any] = self.eval_sets
        if what:
            sets = self.bars.iterate(self.eval_sets, what, len(self.eval_sets), "task")
        return [
            evaluate(self.model, e.x[:limit], e.y[:limit], self.masks.eval(stage, j))
            for j, e in enumerate(sets)
        ]

    def _label(self, t: int) -> str:
        return f"task {t + 1}/{len(self.tasks)}"

    def resume(self, checkpoint: str | os.PathLike[str] | None) -> int:
        """Restore the run from ``checkpoint`` if it holds this config's state; return the
        index of the first task left to train (0 without a checkpoint)."""
        if checkpoint is None:
            return 0
        restored = checkpoints.resume(
            checkpoint,
            self.cfg.to_dict(),
            self.model,
            self.optimizer,
            self.reg,
            self.generator,
            n_tasks=len(self.tasks),
            check_partial=self._partial_problem,
        )
        if restored is None:
            return 0
        first, saved = restored
        self.random_init, self.matrix, self.importance, self.timings, self.step = (
            saved[k] for k in _RUN_STATE[:5]
        )
        self.curves.restore(saved["curves"])  # and logged again: the log files hold it all
        self.t_start -= self.timings.pop("total_s")  # the time the interrupted process(es) took
        return first

    def _partial_problem(self, saved: Any, tasks_done: int) -> str | None:
        """What is wrong with the partial results of a checkpoint after ``tasks_done`` tasks
        (what :meth:`save` writes), or None."""
        problem = mismatch(saved, _PARTIAL_SPEC, "partial.")
        if problem is not None:
            return problem
        n, regularized = len(self.tasks), self.reg is not None
        curves = saved["curves"]
        sizes = {
            "random_init": (len(saved["random_init"]), n),
            "matrix": (len(saved["matrix"]), tasks_done),
            "importance": (len(saved["importance"]), tasks_done if regularized else 0),
            "step": (saved["step"], sum(self.steps_per_task[:tasks_done])),
            "curves.task_boundaries": (len(curves["task_boundaries"]), tasks_done),
            "curves.loss": (len(curves["loss"]), len(curves["step"])),
            "curves.penalty": (len(curves.get("penalty", curves["step"])), len(curves["step"])),
            "curves.accuracy": (len(curves["accuracy"]), len(curves["step"])),
        }
        sizes.update({f"matrix[{i}]": (len(row), n) for i, row in enumerate(saved["matrix"])})
        sizes.update(
            {f"curves.accuracy[{i}]": (len(r), n) for i, r in enumerate(curves["accuracy"])}
        )
        bad = next((k for k, (got, want) in sizes.items() if got != want), None)
        if bad is not None:
            return f"'partial.{bad}' should have size {sizes[bad][1]}, not {sizes[bad][0]}"
        if regularized != ("penalty" in curves):
            return f"'partial.curves.penalty' should {'' if regularized else 'not '}be there"
        names = list(self.reg.importance) if self.reg is not None else []
        for t, entry in enumerate(saved["importance"]):
            problem = summary_problem(entry, names, self.model, self.stream.input_shape, t)
            if problem is not None:
                return f"partial {problem}"
        return None

    def train(self, t: int) -> None:
        """Train task ``t`` (with the tasks before it, for joint training), recording a curve
        point about every tenth of the task; raise DivergedError if the weights blew up."""
        cfg, curves, timings = self.cfg, self.curves, self.timings
        curves.task_boundaries.append(self.step)
        label = f"{self._label(t)} {self.tasks[t].name} · training"
        bar = self.bars.bar(label, self.steps_per_task[t], "step")
        x, y, ids = stage_data(self.train_sets, t, joint=cfg.strategy == "joint")
        # Joint training in the task scenario mixes tasks in a batch: one mask row per sample.
        per_sample = cfg.strategy == "joint" and self.stream.scenario == "task"
        active_row = self.masks.train(t, t)
        every = cfg.eval_every or max(1, self.steps_per_task[t] // 10)
        assert cfg.batch_size is not None
        batches = batch_indices(
            len(y), cfg.batch_size, self.steps_per_task[t], self.generator, self.device
        )
        tic = time.perf_counter()
        for idx in batches:
            if self.step % every == 0:
                timings["train_s"] += time.perf_counter() - tic
                tic = time.perf_counter()
                curves.point(
                    self.step, self.accuracies(t, cfg.curve_samples), penalty_value(self.reg)
                )
                self.check_divergence(t)
                timings["eval_s"] += time.perf_counter() - tic
                tic = time.perf_counter()
            n_batch, idx = len(idx), distributed.shard(idx)
            active = self.masks.rows[ids[idx]] if per_sample else active_row
            curves.add_loss(self.step_fn(x[idx], y[idx], active, n_batch))
            self.step += 1
            bar.update()
        bar.close()
        timings["train_s"] += time.perf_counter() - tic
        self.divergence.check_weights(self.tasks[t].name)

    def check_divergence(self, t: int) -> None:
        """At a curve point of task ``t``: raise DivergedError if the loss since the previous
        point exploded or the weights blew up (values the point has synchronised anyway)."""
        name = self.tasks[t].name
        self.divergence.check_loss(self.curves.loss[-1], name, self.step)
        self.divergence.check_weights(name)

    def consolidate(self, t: int) -> None:
        """End of task ``t``: the regularizer's importance from the task's training data (a
        random subset of ``fisher_samples``), and its summary for the report. Nothing after the
        last task: nothing follows it to protect."""
        reg, cfg = self.reg, self.cfg
        if reg is None or t == len(self.tasks) - 1:
            return
        tic = time.perf_counter()
        train = self.train_sets[t]
        order = torch.randperm(len(train.y), generator=self.generator).to(self.device)
        if cfg.fisher_samples is not None:
            order = order[: cfg.fisher_samples]
        # Each rank its part, in as many batches as the others; the Fisher is summed over ranks.
        parts = distributed.consolidation_batches(order, _consolidation_batch(self.device))
        batches = Batches(train.x, train.y, self.masks.train(t, t), parts)
        what = f"{self._label(t)} · {_importance_name(cfg)} on {sum(map(len, parts))} samples"
        reg.consolidate(self.bars.iterate(batches, what, len(parts), "batch"))
        self.timings["fisher_s"] += time.perf_counter() - tic
        # The report's histograms: under FSDP each layer's importance gathered, one at a time.
        importance = {n: fsdp.full(v) for n, v in reg.importance.items()}
        summary = importance_summary(importance, self.model, self.stream.input_shape, t)
        self.importance.append(summary)

    def test(self, t: int) -> None:
        """After task ``t``: a row of the accuracy matrix (every task's whole evaluation set) and
        a curve point."""
        tic = time.perf_counter()
        what = f"{self._label(t)} · testing on every task"
        self.matrix.append(self.accuracies(t, what=what))
        self.curves.point(
            self.step, self.accuracies(t, self.cfg.curve_samples), penalty_value(self.reg)
        )
        self.check_divergence(t)
        self.timings["eval_s"] += time.perf_counter() - tic

    def save(self, t: int, checkpoint: str | os.PathLike[str] | None) -> None:
        """Write the checkpoint after task ``t`` (none after the last: the results follow)."""
        if checkpoint is None or t == len(self.tasks) - 1:
            return
        self.timings["total_s"] = time.perf_counter() - self.t_start
        values = (
            self.random_init,
            self.matrix,
            self.importance,
            self.timings,
            self.step,
            self.curves.to_dict(),
        )
        partial = dict(zip(_RUN_STATE, values, strict=True))
        checkpoints.save(
            checkpoint,
            self.cfg.to_dict(),
            t + 1,
            self.model,
            self.optimizer,
            self.reg,
            self.generator,
            partial,
        )

    def results(self, settings: dict[str, Any]) -> dict[str, Any]:
        """The results dict (schema ewc.results/1); closes the log."""
        if self.logger is not None:
            self.logger.close()
        self.timings["total_s"] = time.perf_counter() - self.t_start
        cfg = self.cfg
        return {
            "schema": RESULTS_SCHEMA,
            "versions": versions(),
            "hardware": _hardware(self.device),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": cfg.to_dict(),
            "settings": settings,
            "strategy": cfg.strategy,
            "benchmark": self.stream.name,
            "scenario": self.stream.scenario,
            "seed": cfg.seed,
            "task_names": [t.name for t in self.tasks],
            "accuracy_matrix": self.matrix,
            "random_init_accuracy": self.random_init,
            "metrics": compute_metrics(self.matrix, self.random_init),
            "curves": self.curves.to_dict(),
            "timings": self.timings,
            "importance": self.importance,
        }


def _importance_name(cfg: RunConfig) -> str:
    """What ``consolidate`` computes from the task's data, for its progress bar."""
    named = {"mas": "MAS importance", "kfac": "K-FAC factors"}
    return named.get(cfg.strategy, f"{cfg.fisher} Fisher")


def versions() -> dict[str, str]:
    """The versions of ewc, torch and Python, as results files record them."""
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


def _remove_events(log_dir: str | os.PathLike[str]) -> None:
    """Remove the TensorBoard event files of an earlier process of this run from its log folder:
    the run logs everything again (a resumed run its restored points first), as it rewrites
    ``scalars.csv``, so that no point is shown twice."""
    for old in Path(log_dir).glob("events.out.tfevents.*"):
        old.unlink(missing_ok=True)


def _subsample(task: Task, n: int | None, generator: torch.Generator) -> Task:
    if n is None or n >= len(task.train.y):
        return task
    keep = torch.randperm(len(task.train.y), generator=generator)[:n]
    return dataclasses.replace(task, train=task.train.subset(keep))


def _pair_to(pair: Any, device: torch.device) -> Any:
    return type(pair)(pair.x.to(device), pair.y.to(device))
