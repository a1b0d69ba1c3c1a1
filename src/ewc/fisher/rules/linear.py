r"""``nn.Linear``: :math:`y = a W^\top + b`.

Per sample the weight gradient is :math:`\delta_i a_i^\top` (Goodfellow 2015), so for 2-D inputs
:math:`\sum_i g_i^2 = (\delta^2)^\top (a^2)` -- one matmul, no per-sample gradients -- and
likewise :math:`\sum_i |g_i| = |\delta|^\top |a|` (MAS). Both are linear in
:math:`|\delta|^p`, so the passes of the exact Fisher are summed first
(:math:`\sum_k \delta_k^2`) and multiplied once. Inputs ``[N, T..., d]`` sum over positions
inside a sample before squaring, so per-sample gradients are built, in chunks of samples.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .._util import chunk_budget, sample_chunks
from ..persample import power_of_
from . import layer_input, power_of, register_rule, sum_of_powers, trainable


@register_rule(nn.Linear)
def linear_rule(
    module: nn.Linear,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    grad_outputs: list[Tensor],
    power: int = 2,
) -> dict[str, Tensor]:
    """Sum of per-sample gradient powers of ``weight [out, in]`` and ``bias [out]``."""
    a = layer_input(args, kwargs)
    want_w, want_b = trainable(module, "weight"), trainable(module, "bias")
    out: dict[str, Tensor] = {}
    if a.ndim == 2:
        d_p = sum_of_powers(grad_outputs, power)
        if want_w:
            out["weight"] = d_p.T @ power_of(a, power)
        if want_b:
            out["bias"] = d_p.sum(0)
        return out
    a3 = a.flatten(1, -2)
    deltas = [d.flatten(1, -2) for d in grad_outputs]
    if want_w:
        w = a.new_zeros(module.weight.shape)  # full-shape, also for an FSDP shard
        per_sample = module.weight.numel() * a.element_size()
        for rows in sample_chunks(a3.shape[0], per_sample, chunk_budget(a.device)):
            for d in deltas:
                g = torch.bmm(d[rows].transpose(1, 2), a3[rows])  # per-sample [chunk, out, in]
                w += power_of_(g, power).sum(0)
        out["weight"] = w
    if want_b:
        out["bias"] = sum_of_powers([d.sum(1) for d in deltas], power).sum(0)
    return out
