"""EWC as a Lightning ``Callback`` (``pip install 'ewc[lightning]'``).

Usage, one callback for the whole sequence of tasks::

    from ewc.integrations.lightning import EWCCallback

    ewc_cb = EWCCallback(lam=1e3)
    for loader in task_loaders:
        lightning.Trainer(max_epochs=3, callbacks=[ewc_cb]).fit(module, loader)

Per ``fit``, one task:

* ``on_train_start``: the regularizer is bound to the ``LightningModule`` (built at the first
  task on its parameters with ``requires_grad``: with a PEFT model inside, the adapter), and one
  batch of what ``on_train_end`` will read goes through ``forward`` and the likelihood, so a
  wrong ``forward`` or batch format fails now, not after the task has trained.
* ``on_before_optimizer_step``: ``p.grad += λF̄(θ − θ̄)``, once per optimizer step. Lightning
  (2.6) fires it after the last micro-batch of ``accumulate_grad_batches`` (each micro-batch's
  loss already divided by the window), after the AMP GradScaler unscaled the gradients
  (``precision="16-mixed"``; for an optimizer that unscales inside ``step()``, such as a fused
  one, the gradients are still scaled and the penalty's gradient is multiplied by the scale)
  and **before** ``gradient_clip_val`` clipping: in Lightning **the penalty's gradient is
  clipped together with the task's**, as if the penalty were part of the loss (no callback
  event comes between clipping and the step). Under ``"bf16-mixed"`` the gradients are float32.
  Under DDP the task gradients are already averaged over ranks; every rank adds the same penalty.
* ``on_train_batch_end`` of a batch that stepped: ``regularizer.after_step()`` (SI's path
  integral; ``.grad`` still holds the gradient the step used), unless the GradScaler skipped
  the step for inf/NaN gradients (its scale went down).
* ``on_train_end`` (the end of ``fit``'s training, before the strategy's teardown):
  ``consolidate`` from :attr:`EWCCallback.data` if set, else from ``trainer.train_dataloader``
  (under DDP each rank's shard; :func:`ewc.fisher_diagonal` combines the ranks when a process
  group is initialised).

The callback's :meth:`~EWCCallback.state_dict` (the regularizer's state) is saved in Lightning
checkpoints and restored by ``fit(ckpt_path=...)`` or :meth:`~EWCCallback.load_state_dict`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch.amp.grad_scaler import GradScaler, OptState

from ewc._optional import require
from ewc.fisher.batching import Forward, default_forward
from ewc.importance_file import ImportanceFile
from ewc.regularizers import Regularizer

from ._continual import Continual, pending
from ._meter import ReferenceMeter, penalty_of

#: ``lightning.pytorch.Callback`` (typed ``Any``: the framework is an optional dependency)
Callback: Any = require("lightning.pytorch", "lightning").Callback

__all__ = ["EWCCallback", "ForgettingMeter"]


class EWCCallback(Callback):
    """EWC (or another regularizer) for a sequence of ``Trainer.fit`` calls, one per task.

    Args:
        lam: λ of the penalty :math:`\\tfrac{\\lambda}{2}\\sum\\bar F(\\theta-\\bar\\theta)^2`
            (λ = N, a task's number of training samples, is a principled start).
        strategy: ``"ewc"`` (default), ``"online-ewc"``, ``"si"``, ``"mas"`` or ``"l2"``.
        data: what to consolidate from instead of ``trainer.train_dataloader``: batches (a
            DataLoader, a list) or a map-style Dataset (batched like the training loader);
            reassign ``callback.data`` before each task.
        forward: ``forward(module, batch) -> (output, target)`` for the strategies that read
            data; default ``module(batch[0]), batch[1]``.
        start_from: an importance folder (``ewc fisher``'s output, ``reg.save_pretrained``)
            or :class:`~ewc.importance_file.ImportanceFile`, merged as "task 0" when the first
            ``fit`` starts (matched to the module's trainable parameters by name).
        **options: further arguments of the strategy (``fisher="exact"``,
            ``fisher_samples=1000``, ``gamma=0.9``, ``xi=0.1``, ``normalize="mean"``, ...).
    """

    def __init__(
        self,
        lam: float,
        *,
        strategy: str = "ewc",
        data: Any = None,
        forward: Forward | None = None,
        start_from: str | os.PathLike[str] | ImportanceFile | None = None,
        **options: Any,
    ) -> None:
        self.continual = Continual(lam, strategy, forward, options, start_from)
        self.data = data
        self._pending: Mapping[str, Any] | None = None
        self._step_scale: float | None = None  # the loss scale at a step not yet followed up

    @property
    def regularizer(self) -> Regularizer | None:
        """The regularizer (``None`` before the first ``fit`` starts)."""
        return self.continual.regularizer

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        _check_strategy(trainer)
        if self._pending is not None:
            source = "the checkpoint's EWCCallback state (or the one given to load_state_dict())"
            self.continual.restore(pl_module, self._pending, source)
            self._pending = None
        self.continual.check(pl_module, self.data, trainer.train_dataloader)

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        scaler = _enabled_scaler(trainer)
        self._step_scale = 1.0 if scaler is None else float(scaler.get_scale())
        still_scaled = (
            scaler is not None
            and scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.READY
        )
        self.continual.add_penalty_grad(self._step_scale if still_scaled else 1.0)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._step_scale is None:  # no optimizer step in this batch
            return
        scaler = _enabled_scaler(trainer)
        # A GradScaler lowers its scale when it skips a step (inf/NaN gradients): no path then.
        if scaler is None or float(scaler.get_scale()) >= self._step_scale:
            self.continual.after_step()
        self._step_scale = None

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        loader = trainer.train_dataloader
        self.continual.consolidate(pl_module, loader if self.data is None else self.data, loader)

    def state_dict(self) -> dict[str, Any]:
        """The regularizer's state (``{}`` before the first ``fit``); Lightning checkpoints it."""
        if self._pending is not None or self.regularizer is None:
            return dict(self._pending or {})
        return self.regularizer.state_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (e.g. in a new process); it is loaded into the
        regularizer when the next ``fit`` starts."""
        self._pending = pending(state_dict)


class ForgettingMeter(Callback):
    """Logs the loss and accuracy on reference data every ``every`` optimizer steps to the
    trainer's loggers (``trainer.loggers``: TensorBoard, CSV, ...; rank 0 writes), with their
    change since the start of training and the penalty of an :class:`EWCCallback` among the
    trainer's callbacks.

    The first measurement, when the first ``fit`` the meter sees starts, is the baseline of the
    ``*_change`` values; the last is at the end of training.

    Args:
        data: batches (a DataLoader, a list) or a map-style Dataset of reference samples.
        every: optimizer steps between measurements.
        forward: ``forward(module, batch) -> (logits, labels)``; default
            ``module(batch[0]), batch[1]``. Labels of ``-100`` are not counted.
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
        forward: Forward | None = None,
        name: str = "reference",
        batch_size: int = 16,
    ) -> None:
        self.meter = ReferenceMeter(data, forward or default_forward, name, every, batch_size)

    @property
    def history(self) -> list[dict[str, float]]:
        return self.meter.history

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._log(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.meter.due(trainer.global_step):
            self._log(trainer, pl_module)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.global_step != self.meter.last_step:
            self._log(trainer, pl_module)

    def _log(self, trainer: Any, pl_module: Any) -> None:
        metrics = self.meter.measure(pl_module, trainer.global_step, penalty_of(trainer.callbacks))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


def _check_strategy(trainer: Any) -> None:
    """Refuse the strategies whose parameters the regularizer cannot follow: DeepSpeed (ZeRO's
    own flat partitions) and ``FSDPStrategy`` (FSDP1's flat parameters). ``ModelParallelStrategy``
    (FSDP2's ``fully_shard`` in ``configure_model``: DTensor shards) is supported."""
    kinds = {c.__name__ for c in type(getattr(trainer, "strategy", None)).__mro__}
    if "DeepSpeedStrategy" in kinds:
        raise ValueError(
            "EWCCallback does not support DeepSpeedStrategy: ZeRO keeps the parameters in its "
            "own flattened partitions, outside the module, where the regularizer cannot hold its "
            'state shard by shard. Use ModelParallelStrategy (FSDP2), strategy="ddp" or one '
            "device."
        )
    if "FSDPStrategy" in kinds:
        raise ValueError(
            "EWCCallback does not support FSDPStrategy: it is FSDP1, which flattens the "
            "parameters into one buffer per unit. Use ModelParallelStrategy with fully_shard in "
            'configure_model (FSDP2: DTensor shards the regularizer follows), strategy="ddp" or '
            "one device."
        )


def _enabled_scaler(trainer: Any) -> GradScaler | None:
    """The trainer's AMP GradScaler (``precision="16-mixed"``), else ``None``."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None
