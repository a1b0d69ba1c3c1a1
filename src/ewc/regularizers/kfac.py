r"""Kronecker-factored EWC (Ritter, Botev & Barber, NeurIPS 2018, "Online structured Laplace
approximations for overcoming catastrophic forgetting").

Diagonal EWC keeps one number per weight. K-FAC keeps, per ``nn.Linear`` and ``nn.Conv2d``
layer, the Fisher block of the layer's weight matrix :math:`W` (``[out, in]``, the bias folded
in as a last column; a convolution's kernel flattened to ``[C_out, C_in·kh·kw]``) as a
Kronecker product (Martens & Grosse 2015; Grosse & Martens 2016 for convolutions):

.. math:: F_W \approx A \otimes G,\qquad
          A = \frac1N\sum_i \frac1{L}\sum_l \bar a_{il}\bar a_{il}^\top,\qquad
          G = \frac1N\sum_i \sum_l g_{il} g_{il}^\top

with :math:`\bar a_{il}` the layer's input at position :math:`l` of sample :math:`i` (the
unfolded patch for a convolution; :math:`L = 1` for a plain Linear input ``[N, in]``) with a 1
appended for the bias, and :math:`g_{il}` the gradient of :math:`\log p(y \mid x_i)` with
respect to the layer's output there, for the true label (``"empirical"``), one sampled label
(``"sampled"``), or summed over all labels weighted by their probability (``"exact"``, with the
same output-space factors as :func:`ewc.fisher_diagonal`). Means over samples put
:math:`\operatorname{diag}(A\otimes G)` on the scale of the diagonal Fisher, so λ is comparable
with :class:`ewc.EWC`'s (for one sample and :math:`L = 1` it *is* the diagonal Fisher).

The penalty after tasks :math:`1..T`, anchored at the latest task's parameters
:math:`W^*` as in the paper's online Laplace approximation, with decay γ as online EWC:

.. math:: R = \frac{\lambda}{2}\sum_{\text{layers}}\sum_{t\le T}\gamma^{T-t}
          \operatorname{tr}\big(\Delta W^\top G_t\, \Delta W A_t\big),\quad \Delta W = W - W^*,
          \qquad \nabla_W R = \lambda \sum_t \gamma^{T-t} G_t\,\Delta W A_t

-- two small matmuls per layer and task, no autograd graph for :meth:`KFAC.add_penalty_grad`.
Each task's factors are kept: a sum of Kronecker products is not one. Parameters outside such
layers (norms, embeddings, grouped convolutions, a bias whose weight is frozen...) get the
diagonal Fisher, online-accumulated the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.nn import functional as F

from ewc import fsdp
from ewc.fisher._util import eval_mode
from ewc.fisher.batching import Forward, call_forward, default_forward
from ewc.fisher.core import (
    Feed,
    all_reduce,
    check_flag,
    first_samples,
    sample_mean,
    sum_dtype,
)
from ewc.fisher.errors import FisherError
from ewc.fisher.likelihoods import SeededGenerator, output_grads, resolve_likelihood
from ewc.fisher.request import Request
from ewc.fisher.rules import layer_input
from ewc.fisher.rules.conv import padded_2d
from ewc.regularizers.checks import (
    check_fisher_samples,
    check_gamma,
    check_lam,
    trainable,
    warn_at_consolidate,
)
from ewc.regularizers.registry import Strategy, register

KINDS = ("exact", "sampled", "predicted", "empirical")


@dataclass
class _Layer:
    """A Linear or Conv2d layer with its Kronecker factors, one ``(A, G)`` pair per task."""

    name: str
    module: nn.Linear | nn.Conv2d
    weight: str  # parameter names in model.named_parameters()
    bias: str | None
    a: list[Tensor] = field(default_factory=list)  # [K, K], K = in (+ 1 with a bias)
    g: list[Tensor] = field(default_factory=list)  # [out, out]

    def inputs(self, x: Tensor) -> Tensor:
        """The layer's input as ``[N, L, K]``: positions × (features, 1 for the bias)."""
        m = self.module
        if isinstance(m, nn.Conv2d):
            patches = F.unfold(padded_2d(m, x), m.kernel_size, m.dilation, stride=m.stride)
            a = patches.transpose(1, 2)
        else:
            a = x.reshape(x.shape[0], -1, x.shape[-1])
        if self.bias is not None:
            a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
        return a

    def deltas(self, d: Tensor) -> Tensor:
        """An output-gradient as ``[N, L, out]``."""
        if isinstance(self.module, nn.Conv2d):
            return d.flatten(2).transpose(1, 2)
        return d.reshape(d.shape[0], -1, d.shape[-1])

    def matrix(self, params: Mapping[str, Tensor]) -> Tensor:
        """``params``' weight (and bias as a last column) as ``[out, K]``."""
        w = params[self.weight].flatten(1)
        return w if self.bias is None else torch.cat([w, params[self.bias][:, None]], dim=1)


def _factored(module: nn.Module, named: Mapping[int, str]) -> bool:
    """Whether ``module`` is a Linear or ungrouped Conv2d (not a subclass with its own forward)
    whose weight is trainable and whose bias, if any, is trainable too."""
    kinds = (nn.Linear, nn.Conv2d)
    if type(module).forward not in (k.forward for k in kinds) or not isinstance(module, kinds):
        return False
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return False
    weight, bias = module.weight, module.bias
    return id(weight) in named and (bias is None or id(bias) in named)


class KFAC:
    r"""Kronecker-factored EWC; the protocol of :class:`ewc.EWC` (``penalty``,
    ``add_penalty_grad``, ``after_step``, ``consolidate``, ``state_dict``), see the module
    docstring for the math.

    Args:
        model: the network; its parameters with ``requires_grad=True`` are regularized (a
            ``DistributedDataParallel`` wrapper: its ``.module``).
        lam: λ >= 0, on the scale of :class:`ewc.EWC`'s.
        fisher: ``"exact"``, ``"sampled"``, ``"predicted"`` or ``"empirical"`` (as
            :func:`ewc.fisher_diagonal`).
        gamma: decay in (0, 1] of older tasks' factors (1: all tasks count fully, the paper's).
        fisher_samples: use at most this many samples per task (``None``: all).
        likelihood, forward: as :func:`ewc.fisher_diagonal`.
        seed: seeds the labels drawn by ``"sampled"``.
        distributed: all-reduce the factors over ranks under ``torch.distributed`` (default).

    Each layer's module must be called once per forward (no weight sharing through a layer
    called twice). :meth:`proximal_step` raises: the penalty is not diagonal.
    """

    def __init__(
        self,
        model: nn.Module,
        lam: float,
        *,
        fisher: str = "exact",
        gamma: float = 1.0,
        fisher_samples: int | None = None,
        likelihood: Any = "categorical",
        forward: Forward | None = None,
        seed: int = 0,
        distributed: bool = True,
    ) -> None:
        if fisher not in KINDS:
            raise ValueError(f"KFAC needs fisher in {list(KINDS)}; got fisher={fisher!r}.")
        self.gamma = check_gamma(gamma)
        self.fisher_samples = check_fisher_samples(fisher_samples)
        self.likelihood = resolve_likelihood(likelihood, fisher)
        self.lam = check_lam(lam)
        self.fisher = fisher
        self.forward, self.seed = forward or default_forward, seed
        self.distributed = check_flag("distributed", distributed)
        self.model, self._params = trainable(model, "KFAC")
        model = self.model
        if any(fsdp.is_sharded(p) for p in self._params.values()):
            raise ValueError(
                "KFAC does not support FSDP (fully_shard) models: its penalty multiplies each "
                "layer's whole weight difference by Kronecker factors on both sides, which needs "
                "the unsharded layer at every step. Use diagonal EWC (ewc.EWC), whose state is "
                "sharded with the parameters."
            )
        names = {id(p): n for n, p in self._params.items()}
        self._layers = [
            _Layer(
                module_name,
                module,
                names[id(module.weight)],
                None if module.bias is None else names[id(module.bias)],
            )
            for module_name, module in model.named_modules()
            if _factored(module, names)
        ]
        covered = {n for layer in self._layers for n in (layer.weight, layer.bias) if n}
        #: Parameters outside factored layers: diagonal Fisher, online accumulation.
        self.diagonal = [n for n in self._params if n not in covered]
        self._omega = {n: torch.zeros_like(self._params[n]) for n in self.diagonal}
        self._anchor = {n: p.detach().clone() for n, p in self._params.items()}
        self._weights: list[float] = []  # γ^(T-t) per task
        self.n_tasks = 0

    # ------------------------------------------------------------------ every step

    def penalty(self) -> Tensor:
        """The penalty as a differentiable 0-dim tensor (plain autograd; zero before the first
        task). :meth:`add_penalty_grad` adds the same gradient without a graph."""
        p = next(iter(self._params.values()))
        total = torch.zeros((), dtype=p.dtype, device=p.device)
        if self.n_tasks == 0:
            return total
        self._follow_model()
        for layer in self._layers:
            diff = layer.matrix(self._params) - layer.matrix(self._anchor)
            total = total + (self._curvature_times(layer, diff) * diff).sum()
        for n in self.diagonal:
            total = total + (self._omega[n] * (self._params[n] - self._anchor[n]).square()).sum()
        return 0.5 * self.lam * total

    @torch.no_grad()
    def add_penalty_grad(self) -> None:
        r"""``grad += λ Σ_t γ^{T-t} G_t ΔW A_t`` per factored layer and ``λ Ω (θ - θ*)`` for the
        diagonal rest; creates ``.grad`` where it is ``None``. Call after ``backward()`` (after
        ``scaler.unscale_`` with a GradScaler) and before ``optimizer.step()``."""
        if self.n_tasks == 0:
            return
        self._follow_model()
        grads = {}
        for layer in self._layers:
            diff = layer.matrix(self._params) - layer.matrix(self._anchor)
            step = self._curvature_times(layer, diff).mul_(self.lam)
            weight = self._params[layer.weight]
            grads[layer.weight] = step[:, : weight[0].numel()].reshape(weight.shape)
            if layer.bias is not None:
                grads[layer.bias] = step[:, -1]
        for n in self.diagonal:
            grads[n] = self.lam * self._omega[n] * (self._params[n] - self._anchor[n])
        for n, g in grads.items():
            p = self._params[n]
            if p.requires_grad:
                p.grad = g.clone() if p.grad is None else p.grad.add_(g)

    def after_step(self) -> None:
        """Nothing to do after an optimizer step (kept for the common protocol)."""

    def proximal_step(self, lr: float) -> None:
        """Not available: raises ``NotImplementedError`` saying what to use instead."""
        raise NotImplementedError(
            "KFAC has no proximal_step: its penalty couples each layer's weights through "
            "A ⊗ G, so there is no closed-form step per weight. Call add_penalty_grad() after "
            "backward() (or add penalty() to the loss) instead."
        )

    def _curvature_times(self, layer: _Layer, diff: Tensor) -> Tensor:
        """:math:`\\sum_t \\gamma^{T-t} G_t\\,\\Delta W A_t` for ``diff`` = ΔW ``[out, K]``."""
        total = torch.zeros_like(diff)
        for w, a, g in zip(self._weights, layer.a, layer.g, strict=True):
            total = total + w * (g @ diff @ a)
        return total

    # ------------------------------------------------------------------ end of a task

    def consolidate(self, batches: Iterable[Any] | None = None) -> None:
        """End of a task: the factors of its data ``batches`` join the older tasks' (decayed by
        γ), the diagonal rest accumulates online, and the anchor moves to the current
        parameters."""
        if batches is None:
            raise ValueError(
                "KFAC.consolidate() needs batches of the task just learned; pass e.g. the "
                "task's training DataLoader."
            )
        self._follow_model()
        batches = first_samples(batches, self.fisher_samples)
        if self.diagonal:  # read twice: the factors, then the diagonal Fisher of the rest
            batches = list(batches)
        factors = self._factors(batches)
        diagonal = {}
        if self.diagonal:  # hooks on the modules owning these parameters only
            params: dict[str, Tensor] = {n: self._params[n] for n in self.diagonal}
            request = Request(
                self.model,
                params,
                self.forward,
                self.fisher,
                self.likelihood,
                SeededGenerator(self.seed),
            )
            diagonal = sample_mean(request, batches, distributed=self.distributed)
        output_factors = {
            layer.weight: g for layer, (_, g) in zip(self._layers, factors, strict=True)
        }
        warn_at_consolidate(self._params, {**output_factors, **diagonal}, "KFAC")
        with torch.no_grad():
            self._weights = [w * self.gamma for w in self._weights] + [1.0]
            for layer, (a, g) in zip(self._layers, factors, strict=True):
                layer.a.append(a)
                layer.g.append(g)
            for n, f in diagonal.items():
                self._omega[n].mul_(self.gamma).add_(f)
            for n, p in self._params.items():
                self._anchor[n].copy_(p)
        self.n_tasks += 1

    def _factors(self, batches: Iterable[Any]) -> list[tuple[Tensor, Tensor]]:
        """Per layer, ``(A, G)`` over ``batches`` (module docstring), in the parameters' dtype."""
        seen: dict[str, list[tuple[Tensor, GradientEdge]]] = {}

        def record(
            layer: _Layer, module: nn.Module, args: tuple[Any, ...], kwargs: Any, out: Tensor
        ) -> None:
            # The edge is taken now: a later in-place op (ReLU(inplace=True)) cannot move it.
            edge = get_gradient_edge(out)
            seen.setdefault(layer.name, []).append((layer_input(args, kwargs).detach(), edge))

        sums = {}
        for layer in self._layers:
            w = self.model.get_parameter(layer.weight)
            k = layer.matrix(self._anchor).shape[1]
            sums[f"{layer.name}/A"] = w.new_zeros(k, k, dtype=sum_dtype(w))
            sums[f"{layer.name}/G"] = w.new_zeros(w.shape[0], w.shape[0], dtype=sum_dtype(w))
        handles = [
            layer.module.register_forward_hook(partial(record, layer), with_kwargs=True)
            for layer in self._layers
        ]
        rng = SeededGenerator(self.seed)
        feed = Feed(batches, next(iter(self._params.values())))
        total = 0
        try:
            with eval_mode(self.model), torch.enable_grad(), feed.naming_errors():
                for batch in feed:
                    seen.clear()
                    output, target, n = call_forward(self.forward, self.model, batch)
                    calls = [seen.get(layer.name, []) for layer in self._layers]
                    self._check_calls(calls)
                    outs = [c[0][1] for c in calls]
                    for v in output_grads(self.likelihood, self.fisher, output, target, rng):
                        grads = torch.autograd.grad(
                            output, outs, v, retain_graph=True, allow_unused=True
                        )
                        for layer, d in zip(self._layers, grads, strict=True):
                            if d is not None:
                                d = layer.deltas(d).flatten(0, 1)
                                sums[f"{layer.name}/G"] += d.T @ d
                    for layer, call in zip(self._layers, calls, strict=True):
                        a = layer.inputs(call[0][0])
                        positions = a.shape[1]
                        a = a.flatten(0, 1)
                        sums[f"{layer.name}/A"] += (a.T @ a) / positions
                    total += n
        finally:
            for h in handles:
                h.remove()
        if self.distributed:
            total = all_reduce(sums, total)
        if total == 0:
            raise FisherError("batches yielded no samples; pass the task's non-empty data.")
        result = []
        for layer in self._layers:
            dtype = self.model.get_parameter(layer.weight).dtype
            a, g = (sums[f"{layer.name}/{f}"] / total for f in "AG")
            if not bool(torch.isfinite(a).all() and torch.isfinite(g).all()):
                raise FisherError(
                    f"the K-FAC factors of layer {layer.name!r} have NaN/Inf entries: the "
                    "model's activations or gradients overflow."
                )
            result.append((a.to(dtype), g.to(dtype)))
        return result

    def _check_calls(self, calls: list[list[tuple[Tensor, Any]]]) -> None:
        for layer, call in zip(self._layers, calls, strict=True):
            if len(call) != 1:
                raise FisherError(
                    f"layer {layer.name!r} was called {len(call)} times in one forward; K-FAC "
                    "needs each Linear/Conv2d called exactly once. Use ewc.EWC for this model."
                )

    # ------------------------------------------------------------------ views and state

    @property
    def importance(self) -> dict[str, Tensor]:
        """The diagonal of the curvature, :math:`\\sum_t \\gamma^{T-t}\\operatorname{diag}
        (A_t\\otimes G_t)` per weight (diagonal Fisher for the rest), by parameter name."""
        out = {n: t.clone() for n, t in self._omega.items()}
        for layer in self._layers:
            weight = self._params[layer.weight]
            diag = torch.zeros(weight.shape[0], layer.matrix(self._anchor).shape[1])
            diag = diag.to(weight)
            for w, a, g in zip(self._weights, layer.a, layer.g, strict=True):
                diag += w * torch.outer(g.diagonal(), a.diagonal())
            out[layer.weight] = diag[:, : weight[0].numel()].reshape(weight.shape)
            if layer.bias is not None:
                out[layer.bias] = diag[:, -1].clone()
        return {n: out[n] for n in self._params}

    @property
    def anchor(self) -> dict[str, Tensor]:
        """The latest task's parameters, by name (the stored tensors: read only)."""
        return dict(self._anchor)

    @torch.no_grad()
    def _follow_model(self) -> None:
        """Move the state to the parameters' devices and dtypes if the model moved."""
        if all(
            self._anchor[n].device == p.device and self._anchor[n].dtype == p.dtype
            for n, p in self._params.items()
        ):
            return
        for n, p in self._params.items():
            self._anchor[n] = self._anchor[n].to(p)
        for n in self.diagonal:
            self._omega[n] = self._omega[n].to(self._params[n])
        for layer in self._layers:
            ref = self._params[layer.weight]
            layer.a = [t.to(ref) for t in layer.a]
            layer.g = [t.to(ref) for t in layer.g]

    def state_dict(self) -> dict[str, Any]:
        """Tensors, lists, numbers and strings only (``torch.load(weights_only=True)``)."""
        return {
            "type": "KFAC",
            "lam": self.lam,
            "gamma": self.gamma,
            "n_tasks": self.n_tasks,
            "weights": list(self._weights),
            "anchor": {n: t.clone() for n, t in self._anchor.items()},
            "diagonal": {n: t.clone() for n, t in self._omega.items()},
            "factors": {
                layer.name: {"A": [t.clone() for t in layer.a], "G": [t.clone() for t in layer.g]}
                for layer in self._layers
            },
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output onto the parameters' devices, ``lam`` and
        ``gamma`` included (set ``reg.lam`` afterwards to change λ); everything is checked first
        (a refused state changes nothing)."""
        if not isinstance(state, Mapping) or state.get("type") != "KFAC":
            raise ValueError("not a KFAC state dict (its 'type' must be 'KFAC').")
        lam = check_lam(state.get("lam"))  # type: ignore[arg-type]
        gamma, n_tasks, weights = state.get("gamma"), state.get("n_tasks"), state.get("weights")
        if isinstance(n_tasks, bool) or not isinstance(n_tasks, int) or n_tasks < 0:
            raise ValueError(f"state dict 'n_tasks' must be an int >= 0; got {n_tasks!r}.")
        if not (isinstance(gamma, int | float) and 0 < gamma <= 1):
            raise ValueError(f"state dict 'gamma' must lie in (0, 1]; got {gamma!r}.")
        if not (
            isinstance(weights, list)
            and len(weights) == n_tasks
            and all(isinstance(w, int | float) and math.isfinite(w) and w >= 0 for w in weights)
        ):
            raise ValueError(f"state dict 'weights' must be {n_tasks} numbers >= 0.")
        self._check_tensors(state.get("anchor"), dict(self._params), "anchor")
        self._check_tensors(
            state.get("diagonal"), {n: self._params[n] for n in self.diagonal}, "diagonal"
        )
        factors = state.get("factors")
        if not isinstance(factors, Mapping) or set(factors) != {x.name for x in self._layers}:
            raise ValueError("state dict 'factors' must hold this model's factored layers.")
        for layer in self._layers:
            k = layer.matrix(self._anchor).shape[1]
            out = self._params[layer.weight].shape[0]
            for key, size in (("A", k), ("G", out)):
                saved = (
                    factors[layer.name].get(key)
                    if isinstance(factors[layer.name], Mapping)
                    else None
                )
                if not (isinstance(saved, list) and len(saved) == n_tasks) or any(
                    not isinstance(t, Tensor)
                    or t.shape != (size, size)
                    or not bool(torch.isfinite(t).all())
                    for t in saved
                ):
                    raise ValueError(
                        f"state dict factor {key} of layer {layer.name!r} must be {n_tasks} "
                        f"finite [{size}, {size}] tensors."
                    )
        self.lam, self.gamma, self.n_tasks, self._weights = lam, float(gamma), n_tasks, weights
        for n, p in self._params.items():
            self._anchor[n] = state["anchor"][n].to(p).clone()
        for n in self.diagonal:
            self._omega[n] = state["diagonal"][n].to(self._params[n]).clone()
        for layer in self._layers:
            ref = self._params[layer.weight]
            layer.a = [t.to(ref).clone() for t in factors[layer.name]["A"]]
            layer.g = [t.to(ref).clone() for t in factors[layer.name]["G"]]

    @staticmethod
    def _check_tensors(saved: Any, params: Mapping[str, Tensor], key: str) -> None:
        if not isinstance(saved, Mapping) or set(saved) != set(params):
            raise ValueError(f"state dict {key!r} must map {sorted(params)} to tensors.")
        for n, p in params.items():
            t = saved[n]
            if not isinstance(t, Tensor) or t.shape != p.shape or not bool(torch.isfinite(t).all()):
                raise ValueError(
                    f"state dict {key!r}[{n!r}] must be a finite tensor of shape {list(p.shape)}."
                )
            if key == "diagonal" and bool((t < 0).any()):
                raise ValueError(f"state dict 'diagonal'[{n!r}] must be >= 0.")

    def __repr__(self) -> str:
        return (
            f"KFAC(lam={self.lam:g}, fisher={self.fisher!r}, gamma={self.gamma:g}, "
            f"layers={len(self._layers)}, n_tasks={self.n_tasks})"
        )


register(Strategy("kfac", KFAC, 1e4, ("fisher", "gamma"), uses_data=True, proximal=False))
