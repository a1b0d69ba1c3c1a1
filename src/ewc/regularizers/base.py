r"""The shared base of the quadratic penalties: the :class:`Regularizer` protocol and
:class:`QuadraticRegularizer`, one merged quadratic per model. (Longer than our other modules,
about 570 lines, half of them docstrings: one class carries everything the methods share — the
three penalty paths, the merge, state, importance files, FSDP shards — and its invariants stay
in one place; the arithmetic is in :mod:`ewc.regularizers.quadratic`.)

Every regularizer here keeps, per trainable parameter, an importance :math:`\bar\Omega` and an
anchor :math:`\bar\theta`, and adds to the task loss

.. math:: R(\theta) = \frac{\lambda}{2}\Big(\sum_i \bar\Omega_i(\theta_i - \bar\theta_i)^2 + C\Big)

How tasks merge (``mode``)
--------------------------
``"separate"`` (Kirkpatrick et al. 2017, one penalty per old task; Huszár, PNAS 2018, "Note
on the quadratic penalties in elastic weight consolidation", explains why this over-counts):
:math:`\sum_t \tfrac{\lambda}{2}\sum_i F_{t,i}(\theta_i-\theta^*_{t,i})^2`.
A sum of quadratics is one quadratic plus a constant:

.. math:: \sum_t F_t(\theta-\theta_t)^2 = \bar F(\theta-\bar\theta)^2 + C,\quad
          \bar F = \sum_t F_t,\quad \bar\theta = \frac{\sum_t F_t\theta_t}{\bar F}

(:math:`\bar\theta` = the latest :math:`\theta^*` where :math:`\bar F = 0`). It is merged one
task at a time, :math:`a(\theta-x)^2 + b(\theta-y)^2 = (a+b)(\theta-m)^2 + \tfrac{ab}{a+b}
(x-y)^2` with :math:`m = (ax+by)/(a+b)`, the constant summed in float64. So :meth:`penalty`
equals the naive per-task sum in value *and* gradient while memory and time per step stay
O(#parameters) whatever the number of tasks.

``"online"`` (Schwarz et al. 2018, "Progress & compress"; Huszár 2018):
:math:`\bar F \leftarrow \gamma\bar F + F_t`, anchor = the latest :math:`\theta^*`, no constant.
SI and MAS accumulate their importance this way in their papers (``mode="online"``,
``gamma=1``), and that is their default here.


The λ convention, and converting from other code
------------------------------------------------
Ours: :math:`\tfrac{\lambda}{2}\sum\Omega(\theta-\theta^*)^2` with the MEAN per-sample Fisher.

* Code without the ½ (``λ' Σ F (θ-θ*)²``): :math:`\lambda = 2\lambda'`.
* Code that SUMS the per-sample Fisher over :math:`N` samples: :math:`\lambda = N\lambda'`
  (with the ½ convention; combine with the rule above otherwise).
* Code with a batched Fisher (the squared gradient of the mini-batch MEAN loss, batch size
  :math:`B`): :math:`\mathbb{E}[\bar g^2] = g_{\text{full}}^2 + \operatorname{Var}(g)/B`.
  Near a minimum the full-data gradient is small and Var(g) ≈ the mean squared per-sample
  gradient (the empirical Fisher), so their :math:`F \approx F_{\text{emp}}/B` and
  :math:`\lambda \approx \lambda'/B` (against ``fisher="empirical"``). Only an approximation:
  the ratio varies per parameter. (Our ``fisher="batched"`` multiplies by :math:`B` to stay on
  the per-sample scale; see :func:`ewc.fisher.fisher_diagonal`.)
* SI's :math:`c` (penalty :math:`c\sum\Omega(\theta-\theta^*)^2`): :math:`\lambda = 2c`.
  MAS's :math:`\lambda_{\text{MAS}}` (same form): :math:`\lambda = 2\lambda_{\text{MAS}}`.
* A principled start for EWC: with :math:`F` the mean Fisher over the :math:`N` training
  samples of a task, the Laplace approximation of that task's posterior is
  :math:`\tfrac{N}{2}\sum F(\theta-\theta^*)^2`, i.e. :math:`\lambda = N`. Sweep decades around it
  and choose on validation data.

State
-----
:meth:`~QuadraticRegularizer.state_dict` holds only tensors, numbers and strings (safe for
``torch.load(weights_only=True)``): the merged importance and anchor, the constant, the number of
tasks consolidated, the hyper-parameters (``lam``, ``mode``, ``gamma``, SI's ``xi``) and SI's
running path integral. :meth:`~QuadraticRegularizer.load_state_dict` restores all of them.

The parameters regularized are those with ``requires_grad=True`` when the regularizer is
built, by their names in ``model.named_parameters()`` (for a ``DistributedDataParallel``
model, its ``.module``'s names: the regularizer works on the module inside).

Devices and dtypes
------------------
The state follows the model: build the regularizer before or after ``model.to(device)`` /
``model.half()``; every call moves the state to each parameter's device and dtype if the model
has moved since (the parameters must stay the same ``Parameter`` objects, as ``Module.to`` keeps
them). :meth:`~QuadraticRegularizer.load_state_dict` maps saved tensors onto the parameters'
devices. Batches given to ``consolidate`` are moved to the model's device, and under
``torch.distributed`` the importance is all-reduced so that every rank holds the same penalty
(:func:`ewc.fisher.fisher_diagonal`).
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor, nn

from ewc import fsdp
from ewc.regularizers.checks import (
    check_finite,
    check_lam,
    check_mode_gamma,
    check_names_shapes,
    check_positive,
    check_state_dtype,
    trainable,
    warn_at_consolidate,
)
from ewc.regularizers.quadratic import QuadraticPenalty, merge_into

__all__ = ["QuadraticRegularizer", "Regularizer"]

_Q = TypeVar("_Q", bound="QuadraticRegularizer")


@runtime_checkable
class Regularizer(Protocol):
    """What a training loop needs from a continual-learning regularizer."""

    @property
    def importance(self) -> dict[str, Tensor]:
        """The merged per-parameter importance, by parameter name."""
        ...

    def penalty(self) -> Tensor:
        """The penalty as a differentiable scalar (add it to the loss)."""
        ...

    def add_penalty_grad(self) -> None:
        """Add the penalty's gradient to ``p.grad`` (instead of :meth:`penalty`)."""
        ...

    def after_step(self) -> None:
        """Call after every ``optimizer.step()``."""
        ...

    def consolidate(self, batches: Iterable[Any] | None = None) -> None:
        """Call at the end of each task, with batches of the task just learned."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume, for ``torch.save``."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        ...


class QuadraticRegularizer(ABC):
    r"""Base of every penalty here: one merged quadratic :math:`\tfrac{\lambda}{2}(\sum\bar\Omega
    (\theta-\bar\theta)^2 + C)` over the model's trainable parameters (see the module docstring).

    Subclasses define :meth:`task_importance`, the :math:`\Omega_t` of the task just learned.
    :meth:`add_task` merges any importance (yours too) into the state.

    Args:
        model: the network; its parameters with ``requires_grad=True`` are regularized.
        lam: λ >= 0 (module docstring: convention and conversions).
        mode: ``"separate"`` (exact sum of per-task penalties) or ``"online"``
            (:math:`\bar\Omega \leftarrow \gamma\bar\Omega + \Omega_t`, anchor = latest).
        gamma: online decay γ in (0, 1]; only with ``mode="online"``.
        state_dtype: store the importance and anchor in this floating dtype (e.g.
            ``torch.bfloat16``: half the memory of float32 state) instead of each parameter's;
            the arithmetic stays in the parameters' dtype (float32 for float32 parameters).
            ``None`` (default): the parameters' dtype. The penalty then sees the anchor rounded
            to that dtype (docs/gpu-and-distributed.md measures the effect).
    """

    default_mode = "separate"
    #: Whether a task's importance may be negative (SI's path integral), so ``load_state_dict``
    #: accepts negative values; otherwise importance is >= 0.
    signed_importance = False
    #: The attributes holding one state tensor per parameter (moved with the model).
    _per_parameter: tuple[str, ...] = ("_omega", "_anchor")
    #: How :meth:`add_penalty_grad` and :meth:`proximal_step` form :math:`\theta-\bar\theta`,
    #: as ``foreach`` of PyTorch's optimizers: ``None`` (default) chooses per device, ``True``
    #: one multi-tensor kernel for all parameters (fewest kernel launches: the choice on GPUs),
    #: ``False`` one ``torch.sub(..., out=)`` per parameter into a buffer kept between calls (no
    #: allocation: the choice on CPUs, where fresh memory each step costs page faults). The
    #: results are identical; settable on an instance (``reg.foreach = True``).
    foreach: bool | None = None

    def __init__(
        self,
        model: nn.Module,
        lam: float,
        *,
        mode: str | None = None,
        gamma: float = 1.0,
        state_dtype: torch.dtype | None = None,
    ) -> None:
        self.state_dtype = check_state_dtype(state_dtype)
        self.lam = lam
        self.mode, self.gamma = check_mode_gamma(self.default_mode if mode is None else mode, gamma)
        self.model, named = trainable(model, type(self).__name__)
        self._names = list(named)
        self._params: list[Tensor] = list(named.values())
        #: FSDP2 shards (DTensor parameters): the state is sharded like them (see ewc.fsdp).
        self._sharded = fsdp.check_sharding(self._params, type(self).__name__)
        owners = {id(p): (m, k) for m in self.model.modules() for k, p in m._parameters.items()}
        self._owners = [owners[id(p)] for p in self._params]
        with torch.no_grad():
            self._omega = [torch.zeros_like(p, dtype=self._dtype(p)) for p in self._params]
            self._anchor = [p.detach().to(self._dtype(p), copy=True) for p in self._params]
        self._constant = 0.0
        self._scratch: list[Tensor] | None = None  # see _live_diff
        self.n_tasks = 0

    # ------------------------------------------------------------------ hyper-parameters

    @property
    def lam(self) -> float:
        """λ in :math:`\\tfrac{\\lambda}{2}\\sum\\bar\\Omega(\\theta-\\bar\\theta)^2`; settable."""
        return self._lam

    @lam.setter
    def lam(self, value: float) -> None:
        self._lam = check_lam(value)

    @property
    def importance(self) -> dict[str, Tensor]:
        """Merged importance :math:`\\bar\\Omega` by parameter name (the stored tensors: read
        only). Zeros before the first :meth:`consolidate`."""
        return dict(zip(self._names, self._omega, strict=True))

    @property
    def anchor(self) -> dict[str, Tensor]:
        """Merged anchor :math:`\\bar\\theta` by parameter name (the stored tensors: read only)."""
        return dict(zip(self._names, self._anchor, strict=True))

    @property
    def constant(self) -> float:
        """:math:`C`, so that :meth:`penalty` equals the naive per-task sum (0 when online)."""
        return self._constant

    # ------------------------------------------------------------------ every step

    def penalty(self) -> Tensor:
        r""":math:`\tfrac{\lambda}{2}(\sum_i\bar\Omega_i(\theta_i-\bar\theta_i)^2 + C)`, a
        0-dim tensor differentiable in the parameters (its backward is the closed form
        :math:`\lambda\bar\Omega(\theta-\bar\theta)`, computed with foreach ops; double
        backward works too). A zero tensor before the first :meth:`consolidate`."""
        self._follow_model()
        if self.n_tasks == 0:
            p = self._params[0]
            return torch.zeros((), dtype=p.dtype, device=p.device)
        if not self._sharded:
            quadratic = QuadraticPenalty.apply(self.lam, self._omega, self._anchor, *self._params)
            return quadratic + 0.5 * self.lam * self._constant
        # This rank's shards; the value summed over ranks, the gradient of this rank's part
        # (each shard's gradient is its own: as DDP, where every rank adds the whole penalty).
        omega, anchor = ([fsdp.local(t) for t in ts] for ts in (self._omega, self._anchor))
        part = QuadraticPenalty.apply(
            self.lam, omega, anchor, *[fsdp.local(p) for p in self._params]
        )
        total = fsdp.sum_over_ranks(part.detach().clone(), self._params)
        return part + (total - part.detach()) + 0.5 * self.lam * self._constant

    @torch.no_grad()
    def add_penalty_grad(self) -> None:
        r"""``p.grad += λ Ω̄ (p - θ̄)`` for every regularized parameter that requires grad, with
        multi-tensor ``torch._foreach`` ops (the difference as :attr:`foreach` says; creates
        ``p.grad`` if it is ``None``; traces into one graph under ``torch.compile``). Call after
        ``loss.backward()`` and before ``optimizer.step()``, *instead of* adding
        :meth:`penalty` to the loss: the same update for any optimizer, without an autograd
        graph. No-op before the first :meth:`consolidate`."""
        params, _, omega, diff = self._live_diff()
        if not params:
            return
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(fsdp.local(p.grad))
        torch._foreach_addcmul_(grads, omega, diff, value=self.lam)

    @torch.no_grad()
    def proximal_step(self, lr: float) -> None:
        r"""Apply the penalty as an implicit step: :math:`\theta \leftarrow (\tilde\theta +
        \eta\lambda\bar\Omega\bar\theta) / (1 + \eta\lambda\bar\Omega)` with :math:`\eta` = ``lr``.

        This is the exact proximal operator of the penalty, :math:`\arg\min_\theta
        \tfrac{1}{2\eta}\|\theta-\tilde\theta\|^2 + \tfrac{\lambda}{2}\sum\bar\Omega(\theta-
        \bar\theta)^2`. Used as ``loss.backward(); sgd.step(); reg.proximal_step(lr)`` (task
        loss only, no :meth:`penalty` or :meth:`add_penalty_grad`), it is proximal gradient
        descent: exact for plain SGD with learning rate ``lr`` and stable for any λ, where the
        explicit step diverges once ``lr·λ·Ω̄ > 2``. With adaptive optimizers (Adam) the
        effective step differs per parameter, so it is only a heuristic there. Needs
        :math:`\bar\Omega \ge 0` (always true except for SI with negative path integrals).
        Skips parameters that no longer require grad.
        """
        lr = check_positive("lr", lr, "Pass the learning rate of the SGD step just taken.")
        _, params, omega, diff = self._live_diff()
        if not params:
            return
        # θ ← θ - (θ - θ̄) · c / (1 + c) with c = lr·λ·Ω̄, in the parameters' dtype
        c = torch._foreach_mul(
            [o.to(d.dtype) for o, d in zip(omega, diff, strict=True)], lr * self.lam
        )
        shrink = torch._foreach_add(c, 1.0)
        torch._foreach_div_(c, shrink)
        torch._foreach_mul_(diff, c)
        torch._foreach_sub_(params, diff)

    def _live_diff(self) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
        """``(params, local params, importance, params - anchor)`` for the parameters that
        still require grad (empty before the first task), the difference formed as
        :attr:`foreach` says; all but the first on this rank's shards (:func:`ewc.fsdp.local`)."""
        self._follow_model()
        if self.n_tasks == 0:
            return [], [], [], []
        live = [i for i, p in enumerate(self._params) if p.requires_grad]
        if not live:
            return [], [], [], []
        full = [self._params[i] for i in live]
        params, omega, anchor = (
            [fsdp.local(t[i]) for i in live] for t in (self._params, self._omega, self._anchor)
        )
        foreach = self.foreach
        if foreach is None:
            foreach = params[0].device.type != "cpu" or torch.compiler.is_compiling()
        if foreach:  # one launch (and the allocator's cached memory on a GPU)
            return full, params, omega, list(torch._foreach_sub(params, anchor))
        if self._scratch is None:
            self._scratch = [torch.empty_like(fsdp.local(p)) for p in self._params]
        diff = [self._scratch[i] for i in live]
        for p, a, d in zip(params, anchor, diff, strict=True):
            torch.sub(p, a, out=d)
        return full, params, omega, diff

    def after_step(self) -> None:  # noqa: B027 (a hook: deliberately a no-op by default)
        """Call after every ``optimizer.step()``; a no-op except for :class:`SI`."""

    @torch.no_grad()
    def _follow_model(self) -> None:
        """Move every per-parameter state tensor to its parameter's device and dtype, if the
        model moved (``model.to(...)``) since the last call; a few attribute reads otherwise.
        Raises ``ValueError`` when a parameter is no longer the model's (``fully_shard`` after
        the regularizer was built)."""
        self._check_same_parameters()
        if all(
            o.device == p.device and o.dtype == self._dtype(p)
            for o, p in zip(self._omega, self._params, strict=True)
        ):
            return
        for attr in self._per_parameter:
            stored = attr in ("_omega", "_anchor")  # in state_dtype; the others as the parameter
            moved = [
                t.to(device=p.device, dtype=self._dtype(p) if stored else p.dtype)
                for t, p in zip(getattr(self, attr), self._params, strict=True)
            ]
            setattr(self, attr, moved)
        self._scratch = None

    def _dtype(self, p: Tensor) -> torch.dtype:
        """The dtype the importance and anchor of parameter ``p`` are stored in."""
        return self.state_dtype or p.dtype

    def _check_same_parameters(self) -> None:
        """Raise ``ValueError`` if the model's parameters were replaced since the regularizer
        was built (``fully_shard`` replaces every parameter by a DTensor shard; so does assigning
        a new ``nn.Parameter``). FSDP's own swap to the unsharded parameter during a forward
        (the root keeps it until backward) is not a replacement."""
        for (module, key), p, name in zip(self._owners, self._params, self._names, strict=True):
            now = module._parameters.get(key)
            if now is not p and not (self._sharded and not fsdp.is_sharded(now)):
                raise ValueError(
                    f"parameter {name!r} is no longer the tensor this {type(self).__name__} was "
                    "built on: the model was sharded (fully_shard) or its parameters replaced "
                    "after the regularizer was built (or consolidated). Build the regularizer "
                    "after fully_shard, on the final model (load_state_dict restores a saved "
                    "state into it)."
                )

    # ------------------------------------------------------------------ end of a task

    @abstractmethod
    def task_importance(self, batches: Iterable[Any] | None) -> dict[str, Tensor]:
        """:math:`\\Omega_t` of the task just learned, by parameter name."""

    def consolidate(self, batches: Iterable[Any] | None = None) -> None:
        """End of a task: compute its importance (:meth:`task_importance`) and merge it, with
        the current parameters as this task's anchor."""
        self._follow_model()
        importance = self.task_importance(batches)
        warn_at_consolidate(
            dict(zip(self._names, self._params, strict=True)), importance, type(self).__name__
        )
        self.add_task(importance)

    @torch.no_grad()
    def add_task(
        self, importance: Mapping[str, Tensor], anchor: Mapping[str, Tensor] | None = None
    ) -> None:
        r"""Merge one task's importance :math:`\Omega_t` and anchor :math:`\theta^*_t` (default:
        the current parameters) into the state, per ``mode``.

        ``importance`` maps parameter names to tensors shaped like the parameters; names left
        out count as zero importance. Raises ``ValueError`` for unknown names, wrong shapes,
        NaN/Inf, or (``mode="separate"``) negative values.
        """
        self._follow_model()
        omega_t = self._aligned(importance, "importance", partial=True)
        anchor_t = (
            [p.detach().clone() for p in self._params]
            if anchor is None
            else self._aligned(anchor, "anchor", partial=False)
        )
        check_finite(dict(zip(self._names, anchor_t, strict=True)), "anchor")
        # This rank's shards (the tensors themselves for an unsharded model).
        own_omega, own_anchor = ([fsdp.local(t) for t in ts] for ts in (self._omega, self._anchor))
        omega_t, anchor_t = [fsdp.local(t) for t in omega_t], [fsdp.local(t) for t in anchor_t]
        if self.mode == "online":
            torch._foreach_mul_(own_omega, self.gamma)
            torch._foreach_add_(own_omega, omega_t)
            torch._foreach_copy_(own_anchor, anchor_t)
        else:
            counts = fsdp.summed([int((f < 0).sum()) for f in omega_t], self._params)
            negative = [n for n, c in zip(self._names, counts, strict=True) if c]
            if negative:
                raise ValueError(
                    f"mode='separate' needs importance >= 0; negative values in {negative}. "
                    "Use mode='online' (SI's default) or clamp the importance at 0."
                )
            merged = zip(own_omega, own_anchor, omega_t, anchor_t, strict=True)
            parts = [merge_into(*ts) for ts in merged]
            if self._sharded:  # each rank merged its shards: the constant sums over ranks
                parts = [sum(fsdp.summed(parts, self._params))]
            for part in parts:
                self._constant += part
        self.n_tasks += 1

    def _aligned(self, tensors: Mapping[str, Tensor], what: str, partial: bool) -> list[Tensor]:
        """``tensors`` in parameter order, on the parameters' device and dtype, checked. Names
        from a ``DistributedDataParallel`` / ``DataParallel`` wrapper (``module.`` prefixed, as
        ``fisher_diagonal(ddp_model, ...)`` returns them) are read without the prefix."""
        prefixed = all(n.startswith("module.") for n in tensors)
        if tensors and prefixed and not set(tensors) & set(self._names):
            tensors = {n.removeprefix("module."): t for n, t in tensors.items()}
        check_names_shapes(
            tensors, dict(zip(self._names, self._params, strict=True)), what, partial=partial
        )
        check_finite(tensors, what)
        return [
            fsdp.as_layout(tensors[n], p) if n in tensors else torch.zeros_like(p)
            for n, p in zip(self._names, self._params, strict=True)
        ]

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Tensors, numbers and strings only; see the module docstring."""
        return {
            "type": type(self).__name__,
            "lam": self.lam,
            "mode": self.mode,
            "gamma": self.gamma,
            "n_tasks": self.n_tasks,
            "constant": self._constant,
            "importance": {n: o.clone() for n, o in zip(self._names, self._omega, strict=True)},
            "anchor": {n: a.clone() for n, a in zip(self._names, self._anchor, strict=True)},
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output onto the parameters' devices and dtypes, ``lam``,
        ``mode`` and ``gamma`` included (as ``torch.optim`` restores ``lr``): to change λ after
        loading, set ``reg.lam``.

        Everything is checked before anything changes (a failed load leaves the regularizer as it
        was): raises ``ValueError`` naming the problem for a state saved by another regularizer
        type or for a model with other parameter names/shapes, for a bad ``lam``, ``mode``,
        ``gamma`` or ``n_tasks`` (an int >= 0), a non-finite or negative ``constant``, and NaN/Inf
        tensors or negative importance (allowed only for :class:`SI`)."""
        if not isinstance(state, Mapping):
            raise ValueError(f"state must be a dict from state_dict(); got {type(state).__name__}.")
        if state.get("type", type(self).__name__) != type(self).__name__:
            raise ValueError(
                f"state dict was saved by {state['type']}, not {type(self).__name__}; build "
                f"ewc.{state['type']}(model, ...) to load it."
            )
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        if missing:
            raise ValueError(f"state dict lacks key(s) {missing}; was it saved by state_dict()?")
        params = dict(zip(self._names, self._params, strict=True))
        tensors = {k: state[k] for k, v in own.items() if isinstance(v, dict)}
        for key, saved in tensors.items():
            if not isinstance(saved, Mapping):
                raise ValueError(f"state dict {key!r} must map parameter names to tensors.")
            check_names_shapes(saved, params, f"state dict {key!r}", partial=False)
            check_finite(saved, f"state dict {key!r}")
        for saved in tensors.values():  # raises for other world sizes, or sharded for unsharded
            for n, p in params.items():
                if fsdp.is_sharded(saved[n]):
                    fsdp.as_layout(saved[n], p)
        if not self.signed_importance:
            importance = tensors["importance"]
            counts = fsdp.summed(
                [int((fsdp.local(importance[n]) < 0).sum()) for n in params], importance.values()
            )
            negative = [n for n, c in zip(params, counts, strict=True) if c]
            if negative:
                raise ValueError(
                    f"state dict 'importance' is negative in {negative}; {type(self).__name__} "
                    "importance is >= 0. The state is corrupt or was edited."
                )
        mode, gamma = check_mode_gamma(state["mode"], state["gamma"])
        lam = check_lam(state["lam"])
        n_tasks, constant = state["n_tasks"], state["constant"]
        if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks < 0:
            raise ValueError(f"state dict 'n_tasks' must be an int >= 0; got {n_tasks!r}.")
        if isinstance(constant, bool) or not isinstance(constant, (int, float)):
            raise ValueError(f"state dict 'constant' must be a number; got {constant!r}.")
        if not (math.isfinite(constant) and constant >= 0):
            raise ValueError(f"state dict 'constant' must be finite and >= 0; got {constant!r}.")
        self._check_extra_state(state)
        self._follow_model()
        self.lam, self.mode, self.gamma = lam, mode, gamma
        self.n_tasks, self._constant = n_tasks, float(constant)
        for key, saved in tensors.items():
            for own_t, n, p in zip(
                self._state_tensors(key), self._names, self._params, strict=True
            ):
                fsdp.local(own_t).copy_(fsdp.local(fsdp.as_layout(saved[n], p)))

    # ------------------------------------------------------------------ importance files

    def save_pretrained(
        self,
        directory: str | os.PathLike[str],
        *,
        data: Mapping[str, Any] | None = None,
        n_samples: int | None = None,
    ) -> Path:
        """Write the merged importance and anchor as an importance folder
        (``importance.safetensors`` + ``importance.json``, :mod:`ewc.importance_file`), for
        :func:`ewc.load_importance` / :meth:`from_pretrained` in later fine-tunes.

        Args:
            directory: the folder (created if needed; the two files are replaced atomically).
            data: a description of the data the importance came from, stored as is (JSON:
                e.g. ``{"name": "wikitext sample", "path": ...}``).
            n_samples: how many samples it was estimated from (``None``: not recorded).

        Raises ``ValueError`` before the first :meth:`consolidate` (nothing to save) or when
        the importance is negative somewhere (SI's path integral: importance files hold >= 0).
        """
        from ewc.importance_file import ImportanceFile

        return ImportanceFile.of(self, data=data, n_samples=n_samples).save(directory)

    @classmethod
    def from_pretrained(
        cls: type[_Q],
        model: nn.Module,
        directory: str | os.PathLike[str],
        lam: float,
        **kwargs: Any,
    ) -> _Q:
        """``cls(model, lam, **kwargs)`` started from an importance folder: the file's
        importance and anchor merged as one consolidated task ("task 0", e.g. the base model's
        Fisher on general text). Names and shapes are checked against the model's trainable
        parameters (:meth:`ewc.importance_file.ImportanceFile.apply_to`)."""
        from ewc.importance_file import load_importance

        file = load_importance(directory)
        regularizer = cls(model, lam, **kwargs)
        file.apply_to(regularizer)
        return regularizer

    def _check_extra_state(self, state: Mapping[str, Any]) -> None:  # noqa: B027 (a hook)
        """Validate a subclass's own scalars in ``state`` (before :meth:`load_state_dict`
        changes anything); nothing to check here."""

    def _state_tensors(self, key: str) -> list[Tensor]:
        """The stored tensors behind ``state_dict()[key]`` (a per-parameter dict)."""
        return {"importance": self._omega, "anchor": self._anchor}[key]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(lam={self.lam:g}, mode={self.mode!r}, gamma={self.gamma:g}, "
            f"n_tasks={self.n_tasks})"
        )
