"""Synaptic Intelligence (Zenke, Poole & Ganguli, ICML 2017): importance from the path integral
of the loss decrease, accumulated at every step."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ewc import fsdp
from ewc.regularizers.base import QuadraticRegularizer
from ewc.regularizers.checks import check_positive
from ewc.regularizers.registry import Strategy, register


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
        model, lam, mode, gamma, state_dtype: see :class:`QuadraticRegularizer`.
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
        state_dtype: torch.dtype | None = None,
    ) -> None:
        self.xi = check_positive("xi", xi, "SI divides by Δ² + xi; try xi=0.1.")
        super().__init__(model, lam, mode=mode, gamma=gamma, state_dtype=state_dtype)
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
        params, path, previous = ([fsdp.local(t) for t in ts] for ts in zip(*live, strict=True))
        # Every one in live has a grad; the condition narrows the type.
        grads = [fsdp.local(p.grad) for p, _, _ in live if p.grad is not None]
        torch._foreach_sub_(previous, params)  # previous - p = -Δθ, in place: no allocation
        torch._foreach_addcmul_(path, grads, previous)
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
        params, start, path = (
            [fsdp.local(t) for t in ts] for ts in (self._params, self._start, self._path)
        )
        moved_here = sum(not torch.equal(p, s) for p, s in zip(params, start, strict=True))
        moved, integrated = fsdp.summed(
            [moved_here, sum(bool(w.any()) for w in path)], self._params
        )
        if moved and not integrated:
            raise ValueError(
                "SI.consolidate(): the parameters moved during this task but after_step() was "
                "never called, so the path integral is zero and SI would hold nothing. Call "
                "reg.after_step() after every optimizer.step()."
            )
        super().consolidate(batches)
        torch._foreach_zero_(path)
        torch._foreach_copy_(start, params)
        torch._foreach_copy_([fsdp.local(t) for t in self._previous], params)

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
        check_positive("xi", state["xi"], "The state dict's 'xi' is SI's damping.")

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.xi = float(state["xi"])


register(Strategy("si", SI, 1e3, ("xi",)))
