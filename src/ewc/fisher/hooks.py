r"""The hook method: one forward, one backward per output-gradient, per-layer rules.

Forward hooks record each module's call (its inputs :math:`a` and the autograd edge of its
output). Backward passes ask autograd only for the gradients at those edges,
:math:`\delta = \partial \sum_i \ell_i / \partial\,\mathrm{output}` -- no parameter gradient
is formed and ``.grad`` is never touched -- and the module's rule (:mod:`ewc.fisher.rules`)
turns :math:`(a, \delta)` into :math:`\sum_i g_i^2` (or :math:`\sum_i |g_i|` for MAS) for its
direct parameters. Because each edge
is taken when the module returns, a later in-place op (``ReLU(inplace=True)``) does not change
which gradient is read.

The per-sample decomposition needs every module with trainable parameters to be called at most
once per forward and its parameters to be used only inside that call. The engine checks this
on every batch (call counts, parameters shared between modules, parameter uses counted in the
autograd graph, in-place changes of recorded inputs, batch-first outputs) and raises
:class:`HooksUnsupported` naming the module; ``method="auto"`` then switches to ``"func"``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils._pytree import TreeSpec, tree_flatten, tree_leaves, tree_map, tree_unflatten

from ewc import fsdp

from ._util import accumulate, byte_groups
from .batching import batch_size, call_forward
from .errors import FisherError
from .request import Request
from .rules import Rule, generic_rule, rule_for


class HooksUnsupported(FisherError):
    """The model breaks an assumption of the hook method; ``method="func"`` handles it."""


@dataclass
class _Call:
    """What one call of a hooked module left behind."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    out_leaves: list[Any]
    out_spec: TreeSpec
    edges: list[GradientEdge | None]
    versions: list[tuple[Tensor, int]]


@dataclass
class _Hooked:
    """A module with trainable direct parameters, its rule and its calls in this forward."""

    name: str
    module: nn.Module
    rule: Rule
    fast: bool  # a registered rule (True) or the generic fallback
    params: dict[str, tuple[str, Tensor]]  # local name -> (model-level name, parameter)
    calls: list[_Call] = field(default_factory=list)


class HookEngine:
    """Forward hooks on every module that owns trainable parameters (until :meth:`close`).

    Args:
        request: the model, its trainable parameters, the kind of Fisher and how to feed it.
    """

    def __init__(self, request: Request) -> None:
        self.request = request
        model = request.model
        names = {id(p): name for name, p in request.params.items()}
        self._hooked: list[_Hooked] = []
        self._shared: str | None = None
        owners: dict[int, str] = {}
        for module_name, module in model.named_modules():
            name = module_name or type(model).__name__
            params = {}
            for local, p in module.named_parameters(recurse=False):
                if id(p) not in names:
                    continue
                if id(p) in owners:
                    self._shared = (
                        f"parameter {names[id(p)]!r} is shared by modules {owners[id(p)]!r} "
                        f"and {name!r}"
                    )
                owners[id(p)] = name
                params[local] = (names[id(p)], p)
            if params:
                rule = rule_for(module, request.power)
                if rule is None and any(fsdp.is_sharded(p) for _, p in params.values()):
                    raise FisherError(
                        f"module {name!r} ({type(module).__name__}) has no per-layer rule, and "
                        "on an FSDP (fully_shard) model only layers with a rule are supported "
                        "(Linear, Conv1d/2d, BatchNorm, LayerNorm, GroupNorm, Embedding). "
                        "Register one with ewc.fisher.rules.register_rule, or freeze the module."
                    )
                self._hooked.append(
                    _Hooked(name, module, rule or generic_rule, rule is not None, params)
                )
        # Rules written for the Fisher alone need not take power; rule_for skips them otherwise.
        self._power = {} if request.power == 2 else {"power": request.power}
        self._recording = False
        self._n = 0  # samples in the batch being recorded
        self._expanded: str | None = None  # a module whose broadcast output was expanded
        self._handles = [
            h.module.register_forward_hook(partial(self._record, h), with_kwargs=True)
            for h in self._hooked
        ]

    def close(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _record(
        self,
        hooked: _Hooked,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: Any,
    ) -> Any:
        if not self._recording:
            return None
        leaves, spec = tree_flatten(output)
        if _broadcast((args, kwargs), leaves, self._n):
            # No per-sample input (e.g. position ids [1, T]): one output row that the model
            # broadcasts over the batch. Expanded to the batch here (a view), its gradient
            # arrives per sample and the rule sees an ordinary per-sample call.
            args, kwargs = tree_map(partial(_expand, n=self._n), (args, kwargs))
            leaves = [_expand(t, self._n) for t in leaves]
            output = tree_unflatten(leaves, spec)
            self._expanded = hooked.name
        edges = [
            get_gradient_edge(t) if isinstance(t, Tensor) and t.requires_grad else None
            for t in leaves
        ]
        args, kwargs, leaves = tree_map(_detach, (args, kwargs, leaves))
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        versions = [(t, t._version) for t in inputs]  # detach() shares the version counter
        hooked.calls.append(_Call(args, kwargs, leaves, spec, edges, versions))
        return output

    def batch(self, batch: Any) -> tuple[dict[str, Tensor], int]:
        """Sums of per-sample gradient powers over one batch, and its number of samples."""
        self._recording, self._n, self._expanded = True, batch_size(batch), None
        try:
            output, target, n = call_forward(self.request.forward, self.request.model, batch)
        except RuntimeError as e:
            if self._expanded is None:
                raise
            raise HooksUnsupported(
                f"the model failed once the broadcast output of module {self._expanded!r} was "
                f"expanded to the batch ({e}); pass method='func'"
            ) from e
        finally:
            self._recording = False
        try:
            self._check(output, n)
            return self._backward_passes(output, self.request.output_grads(output, target)), n
        finally:
            for h in self._hooked:
                h.calls.clear()

    def _check(self, output: Tensor, n: int) -> None:
        """Raise :class:`HooksUnsupported` where the per-module decomposition would be wrong."""
        advice = "; the hook method cannot split it per module: pass method='func'"
        if self._shared:
            raise HooksUnsupported(self._shared + advice)
        uses = _parameter_uses(output)
        for h in self._hooked:
            where = f"module {h.name!r} ({type(h.module).__name__})"
            if len(h.calls) > 1:
                raise HooksUnsupported(
                    f"{where} is called {len(h.calls)} times in one forward (weight sharing)"
                    + advice
                )
            # A registered rule accounts for one use per call; a generic module may use its
            # parameters several times in its call, but an uncalled module none.
            bounded = h.fast or not h.calls
            for name, p in h.params.values():
                if bounded and uses[id(p)] > len(h.calls):
                    raise HooksUnsupported(
                        f"parameter {name!r} is used outside the forward of {where}" + advice
                    )
            for call in h.calls:
                for leaf, edge in zip(call.out_leaves, call.edges, strict=True):
                    if edge is not None and (leaf.ndim == 0 or leaf.shape[0] != n):
                        raise HooksUnsupported(
                            f"{where} returned shape {list(leaf.shape)}, without the batch's "
                            f"{n} samples along dim 0" + advice
                        )
                if any(t._version != version for t, version in call.versions):
                    raise HooksUnsupported(
                        f"an input of {where} was modified in place after the call" + advice
                    )

    def _backward_passes(self, output: Tensor, vs: Iterator[Tensor]) -> dict[str, Tensor]:
        """Backpropagate each output-gradient in ``vs`` to the recorded edges; apply the rules."""
        calls = [(h, c) for h in self._hooked for c in h.calls if any(c.edges)]
        edges = [e for _, c in calls for e in c.edges if e is not None]
        sums: dict[str, Tensor] = {}
        if not edges or not output.requires_grad:
            return sums

        def backprop(v: Tensor) -> list[Tensor | None]:
            return list(torch.autograd.grad(output, edges, v, retain_graph=True, allow_unused=True))

        def nbytes(grads: list[Tensor | None]) -> int:
            return sum(g.nbytes for g in grads if g is not None)

        for passes in byte_groups(map(backprop, vs), nbytes):
            start = 0
            for h, call in calls:
                stop = start + sum(e is not None for e in call.edges)
                grad_outputs = [_output_grad(call, grads[start:stop]) for grads in passes]
                start = stop
                present = [g for g in grad_outputs if g is not None]
                if present:
                    # Under autocast, inputs and output-gradients may be float16/bfloat16 while
                    # the parameters are float32: rules work in the parameters' dtype.
                    p = next(iter(h.params.values()))[1]
                    args, kwargs, present = _cast((call.args, call.kwargs, present), p.dtype)
                    with torch.no_grad(), torch.autocast(p.device.type, enabled=False):
                        part = h.rule(h.module, args, kwargs, present, **self._power)
                    accumulate(sums, {h.params[local][0]: v for local, v in part.items()})
        return sums


def _broadcast(inputs: Any, out_leaves: list[Any], n: int) -> bool:
    """Whether a call of an ``n``-sample batch has tensor inputs and outputs that all hold one
    row (dim 0 of size 1): a sample-independent result the model broadcasts."""
    ins = [t for t in tree_leaves(inputs) if isinstance(t, Tensor)]
    outs = [t for t in out_leaves if isinstance(t, Tensor)]
    return (
        n > 1
        and bool(ins)
        and bool(outs)
        and all(t.ndim >= 1 and t.shape[0] == 1 for t in (*ins, *outs))
    )


def _expand(leaf: Any, n: int) -> Any:
    """A one-row tensor as an ``n``-row view; anything else unchanged."""
    if isinstance(leaf, Tensor) and leaf.ndim >= 1 and leaf.shape[0] == 1:
        return leaf.expand(n, *leaf.shape[1:])
    return leaf


def _cast(tree: Any, dtype: torch.dtype) -> Any:
    """``tree`` with its floating-point tensors in ``dtype`` (others unchanged)."""
    return tree_map(
        lambda t: t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t, tree
    )


def _detach(leaf: Any) -> Any:
    return leaf.detach() if isinstance(leaf, Tensor) else leaf


def _output_grad(call: _Call, grads: list[Tensor | None]) -> Any:
    """The gradients of one call's output leaves as a pytree (zeros where a leaf got none)."""
    if all(g is None for g in grads):
        return None
    it = iter(grads)
    leaves = []
    for leaf, edge in zip(call.out_leaves, call.edges, strict=True):
        g = next(it) if edge is not None else None
        if g is None and isinstance(leaf, Tensor):
            g = torch.zeros_like(leaf)
        leaves.append(leaf if g is None else g)
    return tree_unflatten(leaves, call.out_spec)


def _parameter_uses(output: Tensor) -> Counter[int]:
    """How many autograd edges lead into each leaf tensor (by ``id``) in ``output``'s graph."""
    uses: Counter[int] = Counter()
    seen = set()
    stack = [] if output.grad_fn is None else [output.grad_fn]
    while stack:
        node = stack.pop()
        for child, _ in node.next_functions:
            if child is None:
                continue
            variable = getattr(child, "variable", None)
            if variable is not None:
                uses[id(variable)] += 1
            elif child not in seen:
                seen.add(child)
                stack.append(child)
    return uses
