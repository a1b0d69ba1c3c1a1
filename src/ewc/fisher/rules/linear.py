r"""``nn.Linear``: :math:`y = a W^\top + b`.

Per sample the weight gradient is :math:`\delta_i a_i^\top` (Goodfellow 2015), so for 2-D inputs
:math:`\sum_i g_i^2 = (\delta^2)^\top (a^2)` -- one matmul, no per-sample gradients. Squares are
linear in :math:`\delta^2`, so the passes of the exact Fisher are summed first
(:math:`\sum_k \delta_k^2`) and multiplied once. Inputs ``[N, T..., d]`` sum over positions
inside a sample before squaring, so per-sample gradients are built, in chunks of samples.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._util import sample_chunks
from . import layer_input, register_rule, sum_of_squares, trainable


@register_rule(nn.Linear)
def linear_rule(
    module: nn.Linear, args: tuple[Any, ...], kwargs: dict[str, Any], grad_outputs: list[Tensor]
) -> dict[str, Tensor]:
    """Sum of squared per-sample gradients of ``weight [out, in]`` and ``bias [out]``."""
    a = layer_input(args, kwargs)
    want_w, want_b = trainable(module, "weight"), trainable(module, "bias")
    out: dict[str, Tensor] = {}
    if a.ndim == 2:
        d2 = sum_of_squares(grad_outputs)
        if want_w:
            out["weight"] = d2.T @ a.square()
        if want_b:
            out["bias"] = d2.sum(0)
        return out
    a3 = a.flatten(1, -2)
    deltas = [d.flatten(1, -2) for d in grad_outputs]
    if want_w:
        w = torch.zeros_like(module.weight)
        per_sample = module.weight.numel() * a.element_size()
        for rows in sample_chunks(a3.shape[0], per_sample):
            for d in deltas:
                w += torch.bmm(d[rows].transpose(1, 2), a3[rows]).square().sum(0)
        out["weight"] = w
    if want_b:
        out["bias"] = sum_of_squares([d.sum(1) for d in deltas]).sum(0)
    return out
