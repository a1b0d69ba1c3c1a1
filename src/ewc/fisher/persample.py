r"""Sums of powers of per-sample gradients with ``torch.func`` (any module, batch-first input).

For a module :math:`m` with parameters :math:`\theta`, inputs :math:`a_i` and output-gradients
:math:`v_{k,i}` (one per backward direction :math:`k`), this computes
:math:`\sum_i \sum_k |J_\theta m(a_i)^\top v_{k,i}|^p` (:math:`p` = 2: squares, the Fisher;
:math:`p` = 1: absolute values, MAS) by a ``vmap`` over samples of a
``vjp`` of ``functional_call(m, θ, a_i)``, in chunks of samples. It is the generic fallback of
the hook method (one module) and the whole ``method="func"`` (the whole model).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_map

from ._util import accumulate, sample_chunks
from .batching import SampleSplit

#: functorch's warning for an op that ``vmap`` runs sample by sample (correct, slower).
_NO_BATCHING_RULE = "There is a performance drop because we have not yet implemented the batching"


def power_of(t: Tensor, power: int) -> Tensor:
    """Elementwise :math:`|t|^p` for ``power`` 1 or 2, as a new tensor."""
    return t.square() if power == 2 else t.abs()


def power_of_(t: Tensor, power: int) -> Tensor:
    """:func:`power_of` in place (for a temporary that is read once)."""
    return t.square_() if power == 2 else t.abs_()


def per_sample_grad_powers(
    module: nn.Module,
    params: dict[str, Tensor],
    inputs: tuple[tuple[Any, ...], dict[str, Any]],
    grad_outputs: list[Any],
    n: int,
    power: int = 2,
) -> dict[str, Tensor]:
    """:math:`\\sum_i \\sum_k |g_{k,i}|^p` for ``params`` (names as in ``module``).

    Args:
        module: called as ``module(*args, **kwargs)`` on a batch of one sample.
        params: the parameters to differentiate (others and buffers are taken from ``module``).
        inputs: ``(args, kwargs)`` of the batched call; per-sample tensors have ``n`` rows.
        grad_outputs: one pytree per backward direction, shaped like ``module``'s output,
            each tensor with ``n`` rows (the gradient of the summed objective at the output).
        n: samples in the batch.
        power: 2 (squares) or 1 (absolute values).
    """
    split = SampleSplit(inputs, n)
    primals = {name: p.detach() for name, p in params.items()}

    def one_sample(rows: list[Tensor], vs: list[Any]) -> dict[str, Tensor]:
        args, kwargs = split.rebuild(rows)
        pullback = vjp(lambda p: functional_call(module, p, args, kwargs), primals)[1]
        total: dict[str, Tensor] = {}
        for v in vs:
            (grads,) = pullback(tree_map(lambda t: t.unsqueeze(0), v))
            accumulate(total, {name: power_of(g, power) for name, g in grads.items()})
        return total

    n_params = sum(p.numel() * p.element_size() for p in primals.values())
    n_inputs = sum(t[0].numel() * t.element_size() for t in split.per_sample)
    sums = {name: torch.zeros_like(p) for name, p in primals.items()}
    for rows in sample_chunks(n, 3 * n_params + 8 * n_inputs):
        with warnings.catch_warnings():  # e.g. attention: right, and slower; nothing to act on
            warnings.filterwarnings("ignore", message=_NO_BATCHING_RULE)
            chunk = vmap(one_sample)(
                [t[rows] for t in split.per_sample],
                [tree_map(lambda t, r=rows: t[r], v) for v in grad_outputs],
            )
        for name, s in chunk.items():
            sums[name] += s.sum(0)
    return sums
