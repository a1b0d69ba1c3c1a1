r"""Quadratic penalties against forgetting: EWC, online EWC, SI, MAS and L2, behind one protocol.

Every regularizer here keeps, per trainable parameter, an importance :math:`\bar\Omega` and an
anchor :math:`\bar\theta`, and adds to the task loss

.. math:: R(\theta) = \frac{\lambda}{2}\Big(\sum_i \bar\Omega_i(\theta_i - \bar\theta_i)^2 + C\Big)

Usage, the same for all of them (``reg`` is any :class:`Regularizer`)::

    reg = EWC(model, lam=...)                 # or OnlineEWC, SI, MAS, L2, make_regularizer(...)
    for task in tasks:
        for batch in task:
            loss = task_loss(model, batch) + reg.penalty()   # autograd path, or ...
            optimizer.zero_grad()
            loss.backward()
            # ... the closed-form path instead of penalty(): p.grad += λ Ω̄ (p - θ̄)
            # reg.add_penalty_grad()
            optimizer.step()
            reg.after_step()                  # EVERY step: SI integrates its path here
        reg.consolidate(batches)              # end of the task: importance + anchor

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

Importance per task
-------------------
* :class:`EWC` / :class:`OnlineEWC` (Kirkpatrick et al., PNAS 2017): the diagonal Fisher from
  :func:`ewc.fisher.fisher_diagonal`, the MEAN over samples of per-sample squared gradients.
* :class:`SI` (Zenke, Poole & Ganguli, ICML 2017): path integral of the loss decrease.
* :class:`MAS` (Aljundi et al., ECCV 2018): mean per-sample :math:`|\partial\|f(x)\|_2^2/
  \partial\theta|`.
* :class:`L2`: :math:`\Omega = 1` (plain weight-space distance to the old solutions).

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
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ewc.fisher import KINDS as FISHER_KINDS
from ewc.fisher import fisher_diagonal
from ewc.fisher.batching import Forward, default_forward
from ewc.fisher.core import check_flag, sample_mean, unwrap
from ewc.fisher.likelihoods import CategoricalLikelihood, SeededGenerator, resolve_likelihood
from ewc.fisher.request import Request

__all__ = [
    "EWC",
    "L2",
    "MAS",
    "MODES",
    "REGULARIZERS",
    "SI",
    "OnlineEWC",
    "QuadraticRegularizer",
    "Regularizer",
    "Strategy",
    "make_regularizer",
    "register",
]

MODES = ("separate", "online")
_MAS_METHODS = ("auto", "hooks", "func")


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


def _check_lam(lam: float) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
        raise ValueError(f"lam must be a finite number >= 0; got lam={lam!r}.")
    if lam < 0:
        raise ValueError(
            f"lam must be >= 0; got lam={lam!r}. The penalty is (lam/2)·Σ Ω (θ-θ*)²: a "
            "negative lam would reward forgetting."
        )
    return float(lam)


def _check_gamma(gamma: Any) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
        raise ValueError(
            f"gamma must lie in (0, 1]; got gamma={gamma!r}. It is the online decay "
            "Ω̄ ← γ·Ω̄ + Ω_t (1 = no forgetting of old importance)."
        )
    return float(gamma)


def _check_fisher_samples(value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(
            f"fisher_samples must be a positive int or None (all samples); got "
            f"fisher_samples={value!r}."
        )
    return value


def _check_mode_gamma(mode: str, gamma: float) -> tuple[str, float]:
    if mode not in MODES:
        raise ValueError(f"unknown mode={mode!r}; choose one of {', '.join(MODES)}.")
    _check_gamma(gamma)
    if mode == "separate" and gamma != 1:
        raise ValueError(
            f"gamma={gamma!r} only applies with mode='online'; pass mode='online' "
            "(or use OnlineEWC), or leave gamma at 1."
        )
    return mode, float(gamma)


def _check_positive(name: str, value: Any, hint: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number; got {name}={value!r}. {hint}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0; got {name}={value!r}. {hint}")
    return float(value)


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
        self, model: nn.Module, lam: float, *, mode: str | None = None, gamma: float = 1.0
    ) -> None:
        self.lam = lam
        self.mode, self.gamma = _check_mode_gamma(
            self.default_mode if mode is None else mode, gamma
        )
        model = unwrap(model)
        self.model = model
        self._names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not self._names:
            raise ValueError(
                f"{type(model).__name__} has no trainable parameters (requires_grad=True); "
                "there is nothing to regularize. Unfreeze some parameters first."
            )
        named = dict(model.named_parameters())
        self._params: list[Tensor] = [named[n] for n in self._names]
        with torch.no_grad():
            self._omega = [torch.zeros_like(p) for p in self._params]
            self._anchor = [p.detach().clone() for p in self._params]
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
        self._lam = _check_lam(value)

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
        if self.n_tasks == 0:
            p = self._params[0]
            return torch.zeros((), dtype=p.dtype, device=p.device)
        self._follow_model()
        quadratic = _QuadraticPenalty.apply(self.lam, self._omega, self._anchor, *self._params)
        return quadratic + 0.5 * self.lam * self._constant

    @torch.no_grad()
    def add_penalty_grad(self) -> None:
        r"""``p.grad += λ Ω̄ (p - θ̄)`` for every regularized parameter that requires grad, with
        multi-tensor ``torch._foreach`` ops (the difference as :attr:`foreach` says; creates
        ``p.grad`` if it is ``None``; traces into one graph under ``torch.compile``). Call after
        ``loss.backward()`` and before ``optimizer.step()``, *instead of* adding
        :meth:`penalty` to the loss: the same update for any optimizer, without an autograd
        graph. No-op before the first :meth:`consolidate`."""
        params, omega, diff = self._live_diff()
        if not params:
            return
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
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
        lr = _check_positive("lr", lr, "Pass the learning rate of the SGD step just taken.")
        params, omega, diff = self._live_diff()
        if not params:
            return
        # θ ← θ - (θ - θ̄) · c / (1 + c) with c = lr·λ·Ω̄
        c = torch._foreach_mul(omega, lr * self.lam)
        shrink = torch._foreach_add(c, 1.0)
        torch._foreach_div_(c, shrink)
        torch._foreach_mul_(diff, c)
        torch._foreach_sub_(params, diff)

    def _live_diff(self) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """``(params, importance, params - anchor)`` for the parameters that still require grad
        (empty before the first task), the difference formed as :attr:`foreach` says."""
        if self.n_tasks == 0:
            return [], [], []
        self._follow_model()
        live = [i for i, p in enumerate(self._params) if p.requires_grad]
        if not live:
            return [], [], []
        params, omega, anchor = (
            [t[i] for i in live] for t in (self._params, self._omega, self._anchor)
        )
        foreach = self.foreach
        if foreach is None:
            foreach = params[0].device.type != "cpu" or torch.compiler.is_compiling()
        if foreach:  # one launch (and the allocator's cached memory on a GPU)
            return params, omega, list(torch._foreach_sub(params, anchor))
        if self._scratch is None:
            self._scratch = [torch.empty_like(p) for p in self._params]
        diff = [self._scratch[i] for i in live]
        for p, a, d in zip(params, anchor, diff, strict=True):
            torch.sub(p, a, out=d)
        return params, omega, diff

    def after_step(self) -> None:  # noqa: B027 (a hook: deliberately a no-op by default)
        """Call after every ``optimizer.step()``; a no-op except for :class:`SI`."""

    @torch.no_grad()
    def _follow_model(self) -> None:
        """Move every per-parameter state tensor to its parameter's device and dtype, if the
        model moved (``model.to(...)``) since the last call; a few attribute reads otherwise."""
        if all(
            o.device == p.device and o.dtype == p.dtype
            for o, p in zip(self._omega, self._params, strict=True)
        ):
            return
        for attr in self._per_parameter:
            moved = [t.to(p) for t, p in zip(getattr(self, attr), self._params, strict=True)]
            setattr(self, attr, moved)
        self._scratch = None

    # ------------------------------------------------------------------ end of a task

    @abstractmethod
    def task_importance(self, batches: Iterable[Any] | None) -> dict[str, Tensor]:
        """:math:`\\Omega_t` of the task just learned, by parameter name."""

    def consolidate(self, batches: Iterable[Any] | None = None) -> None:
        """End of a task: compute its importance (:meth:`task_importance`) and merge it, with
        the current parameters as this task's anchor."""
        self._follow_model()
        self.add_task(self.task_importance(batches))

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
        _check_finite(dict(zip(self._names, anchor_t, strict=True)), "anchor")
        if self.mode == "online":
            torch._foreach_mul_(self._omega, self.gamma)
            torch._foreach_add_(self._omega, omega_t)
            torch._foreach_copy_(self._anchor, anchor_t)
        else:
            negative = [n for n, f in zip(self._names, omega_t, strict=True) if (f < 0).any()]
            if negative:
                raise ValueError(
                    f"mode='separate' needs importance >= 0; negative values in {negative}. "
                    "Use mode='online' (SI's default) or clamp the importance at 0."
                )
            for o, a, f, t in zip(self._omega, self._anchor, omega_t, anchor_t, strict=True):
                self._constant += _merge_into(o, a, f, t)
        self.n_tasks += 1

    def _aligned(self, tensors: Mapping[str, Tensor], what: str, partial: bool) -> list[Tensor]:
        """``tensors`` in parameter order, on the parameters' device and dtype, checked. Names
        from a ``DistributedDataParallel`` / ``DataParallel`` wrapper (``module.`` prefixed, as
        ``fisher_diagonal(ddp_model, ...)`` returns them) are read without the prefix."""
        prefixed = all(n.startswith("module.") for n in tensors)
        if tensors and prefixed and not set(tensors) & set(self._names):
            tensors = {n.removeprefix("module."): t for n, t in tensors.items()}
        _check_names_shapes(
            tensors, dict(zip(self._names, self._params, strict=True)), what, partial=partial
        )
        _check_finite(tensors, what)
        return [
            tensors[n].detach().to(p) if n in tensors else torch.zeros_like(p)
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
            _check_names_shapes(saved, params, f"state dict {key!r}", partial=False)
            _check_finite(saved, f"state dict {key!r}")
        if not self.signed_importance:
            negative = [n for n, t in tensors["importance"].items() if bool((t < 0).any())]
            if negative:
                raise ValueError(
                    f"state dict 'importance' is negative in {negative}; {type(self).__name__} "
                    "importance is >= 0. The state is corrupt or was edited."
                )
        mode, gamma = _check_mode_gamma(state["mode"], state["gamma"])
        lam = _check_lam(state["lam"])
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
            for own_t, n in zip(self._state_tensors(key), self._names, strict=True):
                own_t.copy_(saved[n])  # copy_ converts device and dtype

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


class _QuadraticPenalty(torch.autograd.Function):
    """:math:`\\tfrac{\\lambda}{2}\\sum\\Omega(\\theta-a)^2` with the closed-form backward
    :math:`\\lambda\\Omega(\\theta-a)`, saved from the forward: one multiply in backward instead
    of differentiating through sub/mul/sum. Under ``create_graph=True`` the backward is
    recomputed with differentiable ops, so Hessian-vector products see :math:`\\lambda\\Omega`."""

    @staticmethod
    def forward(
        ctx: Any, lam: float, omega: list[Tensor], anchor: list[Tensor], *params: Tensor
    ) -> Tensor:
        diff = torch._foreach_sub(list(params), anchor)
        weighted = torch._foreach_mul(diff, omega)
        value = torch.stack(
            [torch.dot(w.reshape(-1), d.reshape(-1)) for w, d in zip(weighted, diff, strict=True)]
        ).sum()
        ctx.lam, ctx.omega, ctx.anchor, ctx.n = lam, omega, anchor, len(params)
        ctx.save_for_backward(*weighted, *params)
        return value * (0.5 * lam)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        weighted, params = ctx.saved_tensors[: ctx.n], ctx.saved_tensors[ctx.n :]
        if torch.is_grad_enabled():  # create_graph=True: keep the backward differentiable
            weighted = torch._foreach_mul(torch._foreach_sub(list(params), ctx.anchor), ctx.omega)
        return (None, None, None, *torch._foreach_mul(list(weighted), grad_output * ctx.lam))


def _merge_into(omega: Tensor, anchor: Tensor, f: Tensor, theta: Tensor) -> float:
    """Merge ``f·(θ - theta)²`` into ``omega·(θ - anchor)²`` in place (float64 arithmetic);
    return the constant it adds: Σ omega·f/(omega+f)·(anchor - theta)²."""
    a, x, b, y = (t.double() for t in (omega, anchor, f, theta))
    total = a + b
    nonzero = total != 0
    safe = torch.where(nonzero, total, torch.ones_like(total))
    mean = torch.where(nonzero & (a != 0), (a * x + b * y) / safe, y)  # exactly θ on a first task
    constant = torch.where(nonzero, a * b / safe * (x - y).square(), torch.zeros_like(total))
    omega.copy_(total)
    anchor.copy_(mean)
    return float(constant.sum())


def _check_names_shapes(
    tensors: Mapping[str, Any], params: Mapping[str, Tensor], what: str, partial: bool
) -> None:
    unknown = sorted(set(tensors) - set(params))
    missing = [] if partial else [n for n in params if n not in tensors]
    wrong = [
        f"{n}: {tuple(getattr(tensors[n], 'shape', ()))} vs parameter {tuple(p.shape)}"
        for n, p in params.items()
        if n in tensors and (not isinstance(tensors[n], Tensor) or tensors[n].shape != p.shape)
    ]
    if unknown or missing or wrong:
        parts = [
            f"names not among the model's trainable parameters: {unknown}" if unknown else "",
            f"missing parameters: {missing}" if missing else "",
            f"shape mismatches: {wrong}" if wrong else "",
        ]
        if what.startswith("state dict"):
            fix = "rebuild the model (and freeze the same parameters) as when the state was saved"
        else:
            fix = (
                "the regularizer holds the parameters that had requires_grad=True when it was "
                "built: build it after freezing or unfreezing"
            )
        raise ValueError(
            f"{what} does not match the model: " + "; ".join(p for p in parts if p) + ". "
            f"The regularized parameters are {list(params)}; {fix}."
        )


def _check_finite(tensors: Mapping[str, Tensor], what: str) -> None:
    bad = [n for n, t in tensors.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(
            f"{what} has NaN or Inf values in {bad}. Check the model's outputs and the data "
            "(a diverged model, log(0) in a custom likelihood, or lr too large)."
        )


# ---------------------------------------------------------------------------- the family


class EWC(QuadraticRegularizer):
    r"""Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017).

    :math:`\Omega_t` = the diagonal Fisher at the end of task :math:`t`: the MEAN over samples of
    per-sample squared gradients of :math:`\log p(y\mid x)` (:func:`ewc.fisher.fisher_diagonal`).
    Default ``mode="separate"``: one penalty per old task, as in the paper, merged into one
    quadratic (module docstring).

    Args:
        model, lam, mode, gamma: see :class:`QuadraticRegularizer`.
        fisher: the Fisher kind, one of ``"exact"`` (expectation over the model's predictive
            distribution), ``"sampled"`` (one label drawn per sample, the paper's),
            ``"predicted"`` (the model's argmax label, van de Ven & Tolias 2019's code),
            ``"empirical"`` (true labels), ``"batched"`` (squared mini-batch gradients).
        fisher_samples: use at most this many samples for the Fisher (``None``: all).
        likelihood: ``"categorical"``, ``"bernoulli"`` (one logit per binary label),
            ``"gaussian"`` or a likelihood object.
        forward: ``forward(model, batch) -> (output, target)``; default ``model(x), y``.
        distributed: all-reduce the Fisher over ranks when a ``torch.distributed`` process
            group is initialised (default), so every rank holds the same penalty.
    """

    def __init__(
        self,
        model: nn.Module,
        lam: float,
        *,
        fisher: str = "exact",
        mode: str | None = None,
        gamma: float = 1.0,
        fisher_samples: int | None = None,
        likelihood: Any = "categorical",
        forward: Forward | None = None,
        distributed: bool = True,
    ) -> None:
        if fisher not in FISHER_KINDS:
            raise ValueError(f"unknown fisher={fisher!r}; choose one of {', '.join(FISHER_KINDS)}.")
        _check_fisher_samples(fisher_samples)
        resolve_likelihood(likelihood, fisher)  # an unknown likelihood fails here, not at the end
        super().__init__(model, lam, mode=mode, gamma=gamma)
        self.fisher = fisher
        self.fisher_samples = fisher_samples
        self.likelihood = likelihood
        self.forward = forward
        self.distributed = check_flag("distributed", distributed)

    def task_importance(self, batches: Iterable[Any] | None) -> dict[str, Tensor]:
        """The diagonal Fisher of the current model on ``batches`` (the task just learned)."""
        if batches is None:
            raise ValueError(
                f"{type(self).__name__}.consolidate() needs batches of the task just learned "
                "to estimate the Fisher; pass e.g. the task's training DataLoader."
            )
        return fisher_diagonal(
            self.model,
            batches,
            kind=self.fisher,
            likelihood=self.likelihood,
            n_samples=self.fisher_samples,
            forward=self.forward,
            distributed=self.distributed,
        )


class OnlineEWC(EWC):
    r"""Online EWC (Schwarz et al., ICML 2018, "Progress & compress"; Huszár 2018): EWC with
    ``mode="online"``, :math:`\bar F \leftarrow \gamma\bar F + F_t` and the anchor at the
    latest task's parameters. Arguments as :class:`EWC`, except ``mode``."""

    def __init__(self, model: nn.Module, lam: float, *, gamma: float = 1.0, **kwargs: Any) -> None:
        if "mode" in kwargs:
            raise ValueError("OnlineEWC is always mode='online'; use EWC(mode=...) for others.")
        super().__init__(model, lam, mode="online", gamma=gamma, **kwargs)


class L2(QuadraticRegularizer):
    r"""Uniform importance :math:`\Omega_t = 1` for every parameter.

    Default ``mode="separate"``: the exact sum :math:`\tfrac{\lambda}{2}\sum_t\|\theta-\theta^*_t
    \|^2`, i.e. after :math:`t` tasks weight :math:`t` at the MEAN of the old solutions (plus a
    constant). For the other common baseline, "anchor at the previous task, weight 1", use
    ``mode="online"`` with a small ``gamma`` (weight :math:`1+\gamma+\dots`) — or note that
    ``gamma=1`` gives weight :math:`t` at the latest solution.
    """

    def task_importance(self, batches: Iterable[Any] | None) -> dict[str, Tensor]:
        """Ones; ``batches`` are not needed and ignored."""
        return {n: torch.ones_like(p) for n, p in zip(self._names, self._params, strict=True)}


class SI(QuadraticRegularizer):
    r"""Synaptic Intelligence (Zenke, Poole & Ganguli, ICML 2017).

    **Call** :meth:`after_step` **after every** ``optimizer.step()``: it accumulates the path
    integral :math:`\omega \mathrel{+}= -g\,\Delta\theta`, where :math:`g` is ``p.grad`` at that
    step (the gradient the step used, so *including* the penalty's gradient whichever path
    added it, as in van de Ven's reference implementation; implementations that integrate the
    task-loss gradient alone differ from the second task on) and :math:`\Delta\theta` the
    change since the previous call. Parameters whose ``.grad`` is ``None`` are skipped (they
    did not move).

    At :meth:`consolidate` (no data needed): :math:`\Omega_t = \omega / (\Delta_t^2 + \xi)` with
    :math:`\Delta_t = \theta_{\text{end}} - \theta_{\text{start}}` over the task; then
    :math:`\omega` and :math:`\theta_{\text{start}}` are reset. :math:`\Omega_t` is NOT clamped
    (as in van de Ven's implementation): :math:`\omega` is negative where the steps moved a
    parameter uphill on average (noise, or the penalty pulling against the task), and such a
    parameter is then pushed *away* from its anchor. Default
    ``mode="online"``, ``gamma=1``: importance summed over tasks, anchor at the latest task's
    parameters — the paper's penalty :math:`c\sum_k\tilde\Omega_k(\tilde\theta_k-\theta_k)^2`
    with :math:`c = \lambda/2`.

    Args:
        model, lam, mode, gamma: see :class:`QuadraticRegularizer`.
        xi: damping ξ > 0, in units of parameter²: bounds :math:`\Omega_t` where a parameter
            barely moved over the task.
    """

    default_mode = "online"
    signed_importance = True
    _per_parameter = ("_omega", "_anchor", "_path", "_start", "_previous")

    def __init__(
        self,
        model: nn.Module,
        lam: float,
        *,
        xi: float = 0.1,
        mode: str | None = None,
        gamma: float = 1.0,
    ) -> None:
        self.xi = _check_positive("xi", xi, "SI divides by Δ² + xi; try xi=0.1.")
        super().__init__(model, lam, mode=mode, gamma=gamma)
        with torch.no_grad():
            self._path = [torch.zeros_like(p) for p in self._params]
            self._start = [p.detach().clone() for p in self._params]
            self._previous = [p.detach().clone() for p in self._params]

    @torch.no_grad()
    def after_step(self) -> None:
        """``ω += -p.grad · (p - p_previous)``; ``p_previous = p``. Call after EVERY step."""
        self._follow_model()
        live = [
            (p, w, q)
            for p, w, q in zip(self._params, self._path, self._previous, strict=True)
            if p.grad is not None
        ]
        if not live:
            return
        params, path, previous = (list(t) for t in zip(*live, strict=True))
        torch._foreach_sub_(previous, params)  # previous - p = -Δθ, in place: no allocation
        torch._foreach_addcmul_(path, [p.grad for p in params], previous)
        torch._foreach_copy_(previous, params)

    @torch.no_grad()
    def task_importance(self, batches: Iterable[Any] | None) -> dict[str, Tensor]:
        """:math:`\\omega / ((\\theta - \\theta_{\\text{start}})^2 + \\xi)`; ``batches`` ignored."""
        return {
            n: w / ((p - s).square() + self.xi)
            for n, p, w, s in zip(self._names, self._params, self._path, self._start, strict=True)
        }

    @torch.no_grad()
    def consolidate(self, batches: Iterable[Any] | None = None) -> None:
        """Merge this task's :math:`\\Omega_t`; restart the path integral from here. Raises
        ``ValueError`` (and changes nothing) when the parameters moved during the task but
        :meth:`after_step` was never called: the importance would be zero."""
        self._follow_model()
        moved = any(not torch.equal(p, s) for p, s in zip(self._params, self._start, strict=True))
        if moved and not any(bool(w.any()) for w in self._path):
            raise ValueError(
                "SI.consolidate(): the parameters moved during this task but after_step() was "
                "never called, so the path integral is zero and SI would hold nothing. Call "
                "reg.after_step() after every optimizer.step()."
            )
        super().consolidate(batches)
        torch._foreach_zero_(self._path)
        torch._foreach_copy_(self._start, self._params)
        torch._foreach_copy_(self._previous, self._params)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["xi"] = self.xi
        for key in ("path", "start", "previous"):
            state[key] = {
                n: t.clone() for n, t in zip(self._names, getattr(self, f"_{key}"), strict=True)
            }
        return state

    def _state_tensors(self, key: str) -> list[Tensor]:
        if key in ("path", "start", "previous"):
            return list(getattr(self, f"_{key}"))
        return super()._state_tensors(key)

    def _check_extra_state(self, state: Mapping[str, Any]) -> None:
        _check_positive("xi", state["xi"], "The state dict's 'xi' is SI's damping.")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.xi = float(state["xi"])


class MAS(QuadraticRegularizer):
    r"""Memory Aware Synapses (Aljundi et al., ECCV 2018).

    :math:`\Omega_t = \frac1N\sum_{k=1}^N\big|\partial\,\|f(x_k)\|_2^2/\partial\theta\big|`, the
    paper's definition: per-sample absolute gradients of the squared L2 norm of the output
    (``forward(model, batch)[0]`` if ``forward`` is given; targets are not used, so unlabeled
    data works). Not the absolute value of a mini-batch gradient, as some implementations take:
    :math:`|\sum_k g_k| \le \sum_k |g_k|`, with equality only where the signs agree.

    Computed by the Fisher's machinery (:func:`ewc.fisher.core.sample_mean`) with absolute
    values in place of squares: hooks and per-layer rules (Linear: one matmul
    :math:`|\delta|^\top|a|` over the batch), a per-sample ``torch.func`` vjp for layers without
    a rule, and the whole-model ``vmap`` where hooks cannot split the model. The model is
    evaluated in eval mode (restored afterwards) and no ``.grad`` is touched. Default
    ``mode="online"``, ``gamma=1``: importance accumulated over tasks, anchor at the latest
    parameters, as in the paper.

    Every tensor in a batch whose first dimension equals the batch size is split per sample;
    other leaves are shared by all samples (see :mod:`ewc.fisher.batching`).

    Args:
        model, lam, mode, gamma: see :class:`QuadraticRegularizer`.
        forward: ``forward(model, batch) -> (output, target)``; default ``model(x), y``.
        method: ``"auto"`` (hooks, switching to ``"func"`` where they cannot split the model),
            ``"hooks"`` or ``"func"``, as in :func:`ewc.fisher_diagonal`.
        distributed: all-reduce over ranks under ``torch.distributed``, as :class:`EWC`.
    """

    default_mode = "online"

    def __init__(
        self,
        model: nn.Module,
        lam: float,
        *,
        forward: Forward | None = None,
        mode: str | None = None,
        gamma: float = 1.0,
        method: str = "auto",
        distributed: bool = True,
    ) -> None:
        super().__init__(model, lam, mode=mode, gamma=gamma)
        if method not in _MAS_METHODS:
            raise ValueError(f"method={method!r} is not one of {list(_MAS_METHODS)}; pass one.")
        self.forward = forward
        self.method = method
        self.distributed = check_flag("distributed", distributed)

    def task_importance(self, batches: Iterable[Any] | None) -> dict[str, Tensor]:
        """Mean per-sample :math:`|\\nabla_\\theta\\|f(x)\\|^2|` over ``batches``."""
        if batches is None:
            raise ValueError(
                "MAS.consolidate() needs batches of the task just learned (labels unused); "
                "pass e.g. the task's training DataLoader."
            )
        params = {n: p for n, p in zip(self._names, self._params, strict=True) if p.requires_grad}
        request = _OutputNormRequest(
            self.model,
            params,
            self.forward or default_forward,
            kind="empirical",
            likelihood=CategoricalLikelihood(),  # unused: output_grads is overridden
            rng=SeededGenerator(0),  # unused: nothing is sampled
            power=1,
        )
        return sample_mean(
            request, batches, self.method, what="MAS importance", distributed=self.distributed
        )


@dataclass(frozen=True)
class _OutputNormRequest(Request):
    """MAS as a request to the Fisher machinery: the gradient of :math:`\\sum_i\\|f(x_i)\\|^2`
    at the output is :math:`2f(x_i)`, one backward pass; ``power=1`` sums absolute values."""

    def output_grads(self, output: Tensor, target: Any) -> Iterator[Tensor]:
        return iter([2 * output.detach()])


# ---------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Strategy:
    """A regularizer as the runner, the command line, the configs and the docs know it.

    Attributes:
        name: the strategy's name (``--strategy``, ``make_regularizer``).
        build: the class (or any callable ``build(model, lam=..., **options)``).
        generic_lam: the untuned fallback λ, used where a benchmark's protocol has none.
        options: constructor keywords the runner passes from the ``RunConfig`` fields of the
            same names (e.g. ``("fisher", "gamma")``).
        uses_data: ``consolidate`` reads the task's batches (so ``fisher_samples`` and the
            runner's output masks apply; the runner passes ``forward``).
        proximal: has ``proximal_step`` (``--penalty proximal``).
    """

    name: str
    build: Callable[..., Regularizer]
    generic_lam: float
    options: tuple[str, ...] = ()
    uses_data: bool = False
    proximal: bool = True

    @property
    def settings(self) -> tuple[str, ...]:
        """Every RunConfig field this strategy reads besides the common ones."""
        return ("lam", *self.options, *(("fisher_samples",) if self.uses_data else ()))


#: name -> :class:`Strategy`; :func:`register` adds one (a new method is one class and one call).
REGULARIZERS: dict[str, Strategy] = {}


def register(strategy: Strategy) -> Strategy:
    """Add ``strategy`` to :data:`REGULARIZERS` (replacing one of the same name)."""
    REGULARIZERS[strategy.name] = strategy
    return strategy


register(Strategy("ewc", EWC, 1e4, ("fisher",), uses_data=True))
register(Strategy("online-ewc", OnlineEWC, 1e4, ("fisher", "gamma"), uses_data=True))
register(Strategy("si", SI, 1e3, ("xi",)))
register(Strategy("mas", MAS, 0.1, uses_data=True))
register(Strategy("l2", L2, 1e-3))


def make_regularizer(name: str, model: nn.Module, **kwargs: Any) -> Regularizer:
    """Build a registered regularizer by name (:data:`REGULARIZERS`: ``"ewc"``,
    ``"online-ewc"``, ``"si"``, ``"mas"``, ``"l2"``, ``"kfac"``, ...); ``kwargs`` go to its
    constructor (``lam`` is required)."""
    if name not in REGULARIZERS:
        raise ValueError(f"unknown regularizer {name!r}; choose one of {', '.join(REGULARIZERS)}.")
    return REGULARIZERS[name].build(model, **kwargs)
