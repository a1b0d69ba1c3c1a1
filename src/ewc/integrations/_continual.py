"""What both trainer callbacks share: a regularizer bound to the trainer's model, built on first
use, and the data it consolidates from."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ewc.fisher._util import eval_mode
from ewc.fisher.batching import Forward, call_forward, default_forward, to_device
from ewc.fisher.likelihoods import SeededGenerator, output_grads, resolve_likelihood
from ewc.importance_file import ImportanceFile, load_importance
from ewc.readback import DamagedFileError, read_regularizer_state
from ewc.regularizers import REGULARIZERS, QuadraticRegularizer, Regularizer, make_regularizer


class Continual:
    """A regularizer of the trainer's model, created when training first starts.

    Args:
        lam: λ of the penalty :math:`\\tfrac{\\lambda}{2}\\sum\\bar\\Omega(\\theta-\\bar\\theta)^2`.
        strategy: a name from :data:`ewc.regularizers.REGULARIZERS` (``"ewc"``,
            ``"online-ewc"``, ``"mas"``, ``"si"``, ``"l2"``, ...).
        forward: ``forward(model, batch) -> (output, target)`` for the strategies that read
            data (``uses_data``: EWC, online EWC, MAS, ...); ``None``: ``model(x), y``.
        options: more keyword arguments of the regularizer (``fisher=``, ``fisher_samples=``,
            ``gamma=``, ``xi=``, ...).
        start_from: an importance folder (:func:`ewc.load_importance`: e.g. ``ewc fisher``'s
            output for the base model) or an :class:`~ewc.importance_file.ImportanceFile`,
            merged as a consolidated "task 0" when the regularizer is built, so the first
            training is already penalised. Read and checked here; its names and shapes are
            checked against the model when training starts.

    Every argument is checked here, on a one-parameter stand-in model, so a bad value fails
    when the callback is built rather than after the first task's training.
    """

    def __init__(
        self,
        lam: float,
        strategy: str,
        forward: Forward | None,
        options: dict[str, Any],
        start_from: str | os.PathLike[str] | ImportanceFile | None = None,
    ) -> None:
        if strategy not in REGULARIZERS:
            raise ValueError(
                f"unknown strategy={strategy!r}; choose one of {', '.join(REGULARIZERS)}."
            )
        build = REGULARIZERS[strategy].build
        if start_from is not None and not (
            isinstance(build, type) and issubclass(build, QuadraticRegularizer)
        ):
            raise ValueError(
                f"start_from needs a diagonal strategy (ewc, online-ewc, mas, si, l2); "
                f"{strategy!r} keeps no per-parameter importance to start from."
            )
        if start_from is None or isinstance(start_from, ImportanceFile):
            self.start_from = start_from
        else:
            self.start_from = load_importance(start_from)
        self.strategy = strategy
        self.kwargs = dict(options, lam=lam)
        if forward is not None and REGULARIZERS[strategy].uses_data:
            self.kwargs["forward"] = forward
        self._build(nn.Linear(1, 1))
        self.regularizer: Regularizer | None = None
        self._model: nn.Module | None = None

    def _build(self, model: nn.Module) -> Regularizer:
        return make_regularizer(self.strategy, model, **self.kwargs)

    def bind(self, model: nn.Module) -> Regularizer:
        """The regularizer of ``model``: built on the first call; when a later trainer brings
        another model object, rebuilt on it with the state carried over (the parameter names
        and shapes must match)."""
        if self.regularizer is None or self._model is not model:
            new = self._build(model)
            if self.regularizer is not None:
                new.load_state_dict(self.regularizer.state_dict())
            elif self.start_from is not None:
                assert isinstance(new, QuadraticRegularizer)  # checked in __init__
                self.start_from.apply_to(new)
            self.regularizer, self._model = new, model
        return self.regularizer

    def restore(self, model: nn.Module, state: Any, source: str) -> None:
        """Load ``state`` (a :meth:`Regularizer.state_dict`, from ``source``: a file or "the
        state given to load_state_dict()") into the regularizer of ``model``. Resuming without
        it would drop the earlier tasks' penalty, so a bad state is an error, not a warning:
        :class:`ewc.readback.DamagedFileError` naming the source, what is wrong, and to delete
        it."""
        try:
            self.bind(model).load_state_dict(state)
        except ValueError as e:
            raise DamagedFileError(
                f"the {self.strategy} state in {source} cannot be used: {str(e).rstrip('.')}. "
                "Resuming without it would leave the earlier tasks unprotected: delete it (and "
                "resume from an earlier checkpoint, or train the earlier tasks again)."
            ) from None

    def add_penalty_grad(self, scale: float = 1.0) -> None:
        """``p.grad += scale · λ Ω̄ (p - θ̄)``; ``scale`` is a loss scaler's factor when the
        gradients are still scaled. Nothing before the first consolidation."""
        if self.regularizer is None:
            return
        if scale == 1.0:
            self.regularizer.add_penalty_grad()
            return
        reg: Any = self.regularizer  # the built-in regularizers have a settable ``lam``
        lam = reg.lam
        reg.lam = lam * scale
        try:
            reg.add_penalty_grad()
        finally:
            reg.lam = lam

    def after_step(self) -> None:
        """After every optimizer step that changed the parameters (SI's path integral)."""
        if self.regularizer is not None:
            self.regularizer.after_step()

    def check(self, model: nn.Module, data: Any, like: DataLoader | None) -> None:
        """Feed one batch of what :meth:`consolidate` will read through ``forward`` and the
        likelihood now, when training starts, so that a wrong ``forward``, batch format or
        likelihood fails before the task trains rather than after. The batch comes from
        ``data`` or, for the trainer's own loader, from an unshuffled copy of it: the training
        loader and the global RNG are left as they were. Raises ``ValueError`` naming the
        problem."""
        reg = self.bind(model)
        if not REGULARIZERS[self.strategy].uses_data:
            return
        given = data is not None
        if data is None:
            if not isinstance(like, DataLoader):
                return  # no loader to copy (none, or several): consolidate() checks it
            size = like.batch_size or getattr(like.batch_sampler, "batch_size", None) or 8
            data = DataLoader(like.dataset, batch_size=size, collate_fn=like.collate_fn)
        with torch.random.fork_rng(devices=[]):
            batch = next(iter(as_batches(data, like)), None)
        if batch is None:
            if not given:
                return  # the trainer's own loader, empty: the trainer names it
            raise ValueError(
                f"{self.strategy} has nothing to consolidate this task from: `data` holds no "
                "batches. Give the task's DataLoader, a list of batches or a Dataset."
            )
        forward = getattr(reg, "forward", None) or default_forward
        device = next(p.device for p in model.parameters())
        try:
            with torch.no_grad(), eval_mode(model):
                output, target, _ = call_forward(forward, model, to_device(batch, device))
                likelihood = getattr(reg, "likelihood", None)
                if likelihood is not None:
                    kind = getattr(reg, "fisher", "empirical")
                    got = resolve_likelihood(likelihood, kind)
                    next(output_grads(got, kind, output, target, SeededGenerator(0)), None)
        except torch.OutOfMemoryError:
            raise
        except Exception as e:
            raise ValueError(
                f"{self.strategy} cannot consolidate from this task's data: its first batch "
                f"({_describe(batch)}) failed before training started: "
                f"{str(e).rstrip('.')}. Check `forward` "
                "and `data` (a list counts as batches; a dataset of samples goes in as a "
                "Dataset or DataLoader)."
            ) from e

    def consolidate(self, model: nn.Module, data: Any, like: DataLoader | None) -> None:
        """Importance and anchor of the task just learned, from ``data``: an iterable of batches
        (a ``DataLoader``, a list of batches) or a map-style ``Dataset``, batched like ``like``
        (the trainer's training loader: its batch size and collate function)."""
        self.bind(model).consolidate(as_batches(data, like))


def pending(state: Any) -> Any:
    """A state given to a callback's ``load_state_dict``, to load when training starts: None for
    an empty one (``state_dict()`` before the first training); anything else is kept as given,
    for :meth:`Continual.restore` to check (a tensor or list is refused there, by name)."""
    return None if state is None or (isinstance(state, Mapping) and not state) else state


def as_batches(data: Any, like: DataLoader | None) -> Iterable[Any]:
    """``data`` as an iterable of batches (see :meth:`Continual.consolidate`)."""
    if data is None:
        raise ValueError(
            "there is no data to consolidate from: the trainer has no training dataloader. "
            "Set callback.data to the task's DataLoader (or Dataset) before training."
        )
    if _is_map_dataset(data):
        if like is None:
            return DataLoader(data, batch_size=64)
        return DataLoader(data, batch_size=like.batch_size or 64, collate_fn=like.collate_fn)
    if not isinstance(data, Iterable):
        raise ValueError(
            f"data of type {type(data).__name__} is neither an iterable of batches nor a "
            "map-style Dataset; pass the task's DataLoader, a list of batches or a Dataset."
        )
    return data


def _is_map_dataset(data: Any) -> bool:
    """A map-style dataset (``torch.utils.data.Dataset``, ``datasets.Dataset``): indexed samples,
    not batches. Lists and tuples count as batches."""
    if isinstance(data, (DataLoader, list, tuple)):
        return False
    return isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__"))


def _describe(batch: Any) -> str:
    """A short description of a batch: its type and its tensors' shapes."""

    def shape(v: Any) -> str:
        return str(list(v.shape)) if hasattr(v, "shape") else type(v).__name__

    if isinstance(batch, dict):
        return "dict {" + ", ".join(f"{k}: {shape(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return f"{type(batch).__name__} of [{', '.join(shape(v) for v in batch)}]"
    return type(batch).__name__


def read_state(path: Any) -> dict[str, Any]:
    """A callback state file (``ewc_callback.pt``: a regularizer's ``state_dict``), read
    without running code (:func:`ewc.readback.read_regularizer_state`);
    :class:`ewc.readback.DamagedFileError` naming it when it is truncated, damaged, holds other
    objects, or is not a state, with the fix (delete it)."""
    try:
        return read_regularizer_state(path, what="EWC callback state")
    except DamagedFileError as e:
        raise DamagedFileError(
            f"{e}. Resuming without it would leave the earlier tasks unprotected: delete its "
            "checkpoint folder and resume from an earlier checkpoint (or train the earlier tasks "
            "again)."
        ) from None
