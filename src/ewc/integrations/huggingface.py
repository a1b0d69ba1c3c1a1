"""EWC as a Hugging Face ``transformers.Trainer`` callback (``pip install 'ewc[hf]'``).

Usage, one callback for the whole sequence of tasks::

    from ewc.integrations.huggingface import EWCCallback

    ewc_cb = EWCCallback(lam=1e5)
    for task_dataset in tasks:
        Trainer(model=model, args=args, train_dataset=task_dataset, callbacks=[ewc_cb]).train()

When a task's ``train()`` ends, the callback consolidates from that trainer's training
dataloader (or from ``ewc_cb.data``, when set). In later tasks the optimizer sees the gradient
of the task loss plus :math:`\\tfrac{\\lambda}{2}\\sum\\bar F(\\theta-\\bar\\theta)^2`, the penalty
counted once per optimizer step.

Where the penalty's gradient goes: the Trainer clips the gradient (and, under fp16, unscales
it) before any callback event that follows the backward passes, so the callback adds
:math:`\\lambda\\bar F(\\theta-\\bar\\theta)` at ``on_step_begin`` instead, into the freshly
zeroed ``.grad`` before the step's micro-batches run backward, multiplied by the loss scale
when a ``GradScaler`` is active. The parameters do not change during a step, so this is the
same gradient; the backward passes accumulate onto it, and gradient accumulation, clipping,
unscaling and DDP's all-reduce (identical penalties on every rank average to themselves) then
see exactly the gradient of "task loss + penalty". SI's path integral is updated at
``on_optimizer_step``, skipped when the loss scaler skipped the step. The consolidation runs the
model without the autocast that accelerate wraps around its ``forward`` under ``bf16`` /
``fp16``: the Fisher is computed in the parameters' precision.

With a PEFT model, the parameters regularized are those that require grad when the first
training starts: the adapter (and ``modules_to_save``, e.g. the classification head), not the
frozen base. Under FSDP2 (``fsdp="full_shard"``, accelerate's default FSDP version) the
regularizer's state is sharded with the parameters (docs/gpu-and-distributed.md); DeepSpeed
and FSDP1 are refused.

Checkpoints: every checkpoint the Trainer saves (``output_dir/checkpoint-<step>``) also gets
the regularizer's state, :data:`STATE_FILE`, written by the main process. ``train(
resume_from_checkpoint=...)`` of a checkpoint in ``output_dir`` loads it back at the start of
training, also into a new callback in a new process, so the earlier tasks' penalty survives a
crash; for a checkpoint elsewhere, call
``ewc_cb.load_state_dict(ewc.integrations.read_state(path / STATE_FILE))`` before ``train``.
A state file that is truncated, damaged or not a regularizer state stops training with one line
naming it (``ewc.readback.DamagedFileError``): resuming without it would leave the earlier
tasks unprotected.
"""

from __future__ import annotations

import inspect
import io
import os
import warnings
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ewc import fsdp
from ewc._optional import require
from ewc.fisher.batching import Forward
from ewc.fisher.errors import FisherError
from ewc.importance_file import ImportanceFile
from ewc.regularizers import Regularizer
from ewc.results import atomic_write_bytes

from ._continual import Continual, pending, read_state
from ._meter import ReferenceMeter, penalty_of

_transformers = require("transformers", "hf")
#: ``transformers.TrainerCallback`` (typed ``Any``: the framework is an optional dependency)
TrainerCallback: Any = _transformers.TrainerCallback
#: The regularizer's state in each Trainer checkpoint folder.
STATE_FILE = "ewc_callback.pt"
#: Where a state given to ``load_state_dict`` came from, for messages.
_GIVEN = "the state given to EWCCallback.load_state_dict()"

__all__ = [
    "STATE_FILE",
    "EWCCallback",
    "ForgettingMeterCallback",
    "logits_and_labels",
    "next_token_logits_and_labels",
]


def logits_and_labels(model: nn.Module, batch: Any) -> tuple[Tensor, Any]:
    """The default ``forward`` for Hugging Face batches: ``model(**inputs).logits`` and
    ``batch["labels"]``, where ``inputs`` is the batch without ``labels`` (so the model computes
    no loss; with ``return_dict=False``, the first item of the output tuple). Fits sequence
    classification (logits ``[N, C]``, labels ``[N]``) and token classification
    (``[N, T, C]``, ``[N, T]``, ``-100`` where a token has no label); for a causal language
    model use :func:`next_token_logits_and_labels`, for other heads your own ``forward``."""
    if not (isinstance(batch, dict) and "labels" in batch):
        raise FisherError(
            f"a batch of type {type(batch).__name__} has no 'labels' entry; pass "
            "EWCCallback(forward=lambda model, batch: (output, target)) to say how to feed it."
        )
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**inputs)
    if hasattr(out, "logits"):
        return out.logits, batch["labels"]
    return (out[0] if isinstance(out, (tuple, list)) else out), batch["labels"]


def next_token_logits_and_labels(model: nn.Module, batch: Any) -> tuple[Tensor, Any]:
    """``forward`` for causal language models: the logits ``[N, T-1, V]`` at positions 0..T-2
    and the labels ``[N, T-1]`` at 1..T-1, each position predicting the next token (the models
    shift inside their own loss; here the shift is explicit). ``-100`` labels (padding, prompt
    tokens) add nothing. Use it with ``fisher="sampled"`` or ``"empirical"``: the exact Fisher
    would cost a backward pass per position and vocabulary entry."""
    logits, labels = logits_and_labels(model, batch)
    return logits[:, :-1], labels[:, 1:]


class EWCCallback(TrainerCallback):
    """EWC (or another regularizer of :mod:`ewc.regularizers`) for a sequence of ``Trainer`` runs.

    Args:
        lam: λ >= 0, our convention (README: "Our λ convention").
        strategy: ``"ewc"`` (default), ``"online-ewc"``, ``"mas"``, ``"si"`` or ``"l2"``.
        data: what to consolidate from at the end of the next ``train()``: an iterable of
            batches (a ``DataLoader``, a list of batch dicts) or a map-style dataset (batched
            with the trainer's batch size and collator). ``None`` (default): the trainer's own
            training dataloader. A public attribute: set it again before each task if needed.
        forward: ``forward(model, batch) -> (output, target)``; default
            :func:`logits_and_labels`.
        start_from: an importance folder (``ewc fisher``'s output, ``reg.save_pretrained``)
            or :class:`~ewc.importance_file.ImportanceFile`: its importance and anchor are
            "task 0" (e.g. the base model's abilities), so the first ``train()`` is penalised
            too. Read when the callback is built; matched to the model when training starts.
        options: passed to the regularizer, e.g. ``fisher="empirical"``,
            ``fisher_samples=2000``, ``gamma=0.9`` (online EWC), ``xi=0.1`` (SI),
            ``normalize="mean"`` (EWC: the Fisher divided by its mean, a λ that carries across
            models; the regularizer's ``stats`` say what each consolidation saw).

    Attributes:
        regularizer: the regularizer (:class:`~ewc.regularizers.Regularizer`) of the trainer's model
            (``None`` until the first ``train()`` starts); save it with ``state_dict()``.
        data: see above.
    """

    def __init__(
        self,
        lam: float,
        *,
        strategy: str = "ewc",
        data: Any = None,
        forward: Forward = logits_and_labels,
        start_from: str | os.PathLike[str] | ImportanceFile | None = None,
        **options: Any,
    ) -> None:
        self._continual = Continual(lam, strategy, forward, options, start_from)
        self.data = data
        self._pending: Mapping[str, Any] | None = None
        self._source = _GIVEN  # where _pending came from, for messages
        self._precision: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
        self._start_step = 0  # the global step this train() started at

    @property
    def regularizer(self) -> Regularizer | None:
        return self._continual.regularizer

    def state_dict(self) -> dict[str, Any]:
        """The regularizer's state (``{}`` before the first ``train``); in every checkpoint."""
        if self._pending is not None or self.regularizer is None:
            return dict(self._pending or {})
        return self.regularizer.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; loaded into the regularizer (and checked) when
        ``train`` starts."""
        self._pending, self._source = pending(state_dict), _GIVEN

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        _check_sharding(args)
        self._check_precision(kwargs["model"], args)
        regularizer = self._continual.bind(kwargs["model"])
        if state is not None and state.global_step > 0:  # resumed from a checkpoint
            saved = _checkpoint_folder(args, state) / STATE_FILE
            if saved.is_file():
                self._pending, self._source = read_state(saved), repr(str(saved))
                done, have = self._pending.get("n_tasks", 0), getattr(regularizer, "n_tasks", 0)
                if done < have:
                    warnings.warn(
                        f"the checkpoint training resumes from ({saved.parent}) holds {done} "
                        f"consolidated task(s) but this callback has {have}: it was written "
                        "during an earlier task, so that task's weights and penalty replace "
                        "this one's. Give each task its own output_dir.",
                        stacklevel=2,
                    )
            else:
                warnings.warn(
                    f"training resumes at step {state.global_step} but {saved} does not exist, "
                    "so the regularizer keeps the state it has in this process (none in a new "
                    "one: earlier tasks unprotected). For a checkpoint outside output_dir call "
                    "ewc_cb.load_state_dict(ewc.integrations.read_state(<checkpoint>/"
                    f"{STATE_FILE})) before train().",
                    stacklevel=2,
                )
        if self._pending is not None:
            self._continual.restore(kwargs["model"], self._pending, self._source)
            self._pending = None
        self._start_step = state.global_step if state is not None else 0
        with _plain_forward(kwargs["model"]):
            self._continual.check(kwargs["model"], self.data, kwargs.get("train_dataloader"))

    def _check_precision(self, model: nn.Module, args: Any) -> None:
        """Warn when a later task's ``Trainer`` asks for another mixed precision than the one that
        prepared ``model``: accelerate prepares a model once (it marks it), so the first
        precision silently holds (docs/integrations/huggingface.md, "Known limits")."""
        bf16, fp16 = getattr(args, "bf16", False), getattr(args, "fp16", False)
        asked = "bf16" if bf16 else "fp16" if fp16 else "fp32"
        first = self._precision.setdefault(model, asked)
        if first != asked and getattr(model, "_is_accelerate_prepared", False):
            warnings.warn(
                f"this Trainer asks for {asked} but an earlier task's Trainer prepared the model "
                f"in {first}, and accelerate does not prepare a model twice: this task trains in "
                f"{first} too. Use the same precision (bf16/fp16 in TrainingArguments) for every "
                "task.",
                stacklevel=2,
            )

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        saved = fsdp.gathered(self.state_dict())  # FSDP: on every rank (an all-gather)
        if state.is_world_process_zero:
            buffer = io.BytesIO()
            torch.save(saved, buffer)
            atomic_write_bytes(_checkpoint_folder(args, state) / STATE_FILE, buffer.getvalue())

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        scaler = getattr(kwargs.get("optimizer"), "scaler", None)
        scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0
        self._continual.add_penalty_grad(scale)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not getattr(kwargs.get("optimizer"), "step_was_skipped", False):
            self._continual.after_step()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state is not None and state.global_step == self._start_step:
            warnings.warn(
                f"this train() ran no optimizer step (it started at step {state.global_step}, "
                "e.g. resumed from a checkpoint whose training had finished), so the callback "
                "consolidates this task's data at weights that did not learn it. "
                "resume_from_checkpoint=True takes the newest checkpoint in output_dir, which "
                "is the previous task's when tasks share one: give each task its own output_dir.",
                stacklevel=2,
            )
        model, loader = kwargs["model"], kwargs.get("train_dataloader")
        data = self.data if self.data is not None else loader
        with _plain_forward(model):
            self._continual.consolidate(model, data, like=loader)


class ForgettingMeterCallback(TrainerCallback):
    """Logs the loss and accuracy on reference data every ``every`` optimizer steps through the
    Trainer's own ``log`` (so into ``state.log_history`` and every ``report_to`` logger:
    TensorBoard, CSV, W&B, ...), with their change since the start of training and the EWC
    penalty when an :class:`EWCCallback` is among the trainer's callbacks.

    Usage: ``Trainer(..., callbacks=[ewc_cb, ForgettingMeterCallback(task_a_batches,
    forward=next_token_logits_and_labels)])``. The first measurement, at the start of the first
    ``train()`` the meter sees, is the baseline of the ``*_change`` values (build a new meter to
    measure from another start); the last is at the final step.

    Args:
        data: the reference data: batches (a list of batch dicts, e.g. from
            :func:`ewc.lm.text_batches`, or a ``DataLoader``) or a map-style dataset.
        every: optimizer steps between measurements.
        forward: ``forward(model, batch) -> (logits, labels)``; default
            :func:`logits_and_labels`, for a causal LM :func:`next_token_logits_and_labels`.
        name: metric prefix: ``{name}/loss``, ``{name}/loss_change`` (relative),
            ``{name}/accuracy``, ``{name}/accuracy_change``; and ``ewc/penalty``.
        batch_size: the batch size for a map-style ``data``.

    Attributes:
        history: every measurement, ``{"step": ..., metric: value}``.
    """

    def __init__(
        self,
        data: Any,
        *,
        every: int = 50,
        forward: Forward = logits_and_labels,
        name: str = "reference",
        batch_size: int = 16,
    ) -> None:
        self.meter = ReferenceMeter(data, forward, name, every, batch_size)
        self._trainer: Any = None

    @property
    def history(self) -> list[dict[str, float]]:
        return self.meter.history

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._trainer = _calling_trainer()
        self._log(state, control, kwargs["model"])

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.meter.due(state.global_step) or state.global_step == state.max_steps:
            self._log(state, control, kwargs["model"])

    def _log(self, state: Any, control: Any, model: nn.Module) -> None:
        if state.global_step == self.meter.last_step:
            return
        trainer = self._trainer
        penalty = penalty_of(trainer.callback_handler.callbacks)
        metrics = self.meter.measure(model, state.global_step, penalty)
        should_log = control.should_log  # Trainer.log resets it: keep the loss log of this step
        trainer.log(dict(metrics))
        control.should_log = should_log


def _calling_trainer() -> Any:
    """The ``transformers.Trainer`` whose callback handler is running: the first caller frame
    whose ``self`` is one (a callback receives the model and data, not the trainer)."""
    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, _transformers.Trainer):
            return owner
        frame = frame.f_back
    raise ValueError(
        "ForgettingMeterCallback logs through its Trainer, but no transformers.Trainer is "
        "calling it; pass it in Trainer(callbacks=[...]) or trainer.add_callback(...)."
    )


def _check_sharding(args: Any) -> None:
    """Refuse DeepSpeed and FSDP1 (by ``TrainingArguments``); FSDP2, whose parameters are
    ``DTensor`` shards, is supported (docs/gpu-and-distributed.md)."""
    if getattr(args, "deepspeed", None):
        raise ValueError(
            "EWCCallback does not support DeepSpeed: ZeRO keeps the parameters in its own "
            "flattened partitions, outside the module, where the regularizer cannot hold its "
            "state shard by shard. Use FSDP2 (fsdp='full_shard' in TrainingArguments) or DDP."
        )
    config = getattr(args, "fsdp_config", None) or {}
    if getattr(args, "fsdp", None) and int(config.get("version", 2)) != 2:
        raise ValueError(
            "EWCCallback does not support FSDP1 (fsdp_config version 1): it flattens the "
            "parameters into one buffer per unit. Use FSDP2 (fsdp_config={'version': 2}, the "
            "default), whose parameters are DTensor shards the regularizer follows."
        )


def _checkpoint_folder(args: Any, state: Any) -> Path:
    """The Trainer's checkpoint folder for the current step: ``output_dir/checkpoint-<step>``."""
    prefix = require("transformers.trainer_utils", "hf").PREFIX_CHECKPOINT_DIR
    return Path(args.output_dir) / f"{prefix}-{state.global_step}"


@contextmanager
def _plain_forward(model: nn.Module) -> Iterator[None]:
    """``model.forward`` without the autocast that accelerate wraps around it for ``bf16`` /
    ``fp16`` training (it keeps the plain one as ``model._original_forward``): inside, the
    Fisher is computed in the parameters' own precision."""
    plain = getattr(model, "_original_forward", None)
    if plain is None:
        yield
        return
    wrapped = model.forward
    model.forward = plain
    try:
        yield
    finally:
        model.forward = wrapped
