r"""``nn.Conv1d`` / ``nn.Conv2d`` (any padding mode, stride, dilation, groups).

With the padded input :math:`x_i` and the output-gradient :math:`\delta_i` (``[C_out, L]``, ``L``
output positions), the per-sample weight gradient is :math:`\delta_i U_i^\top`, where
:math:`U_i` (``[C_in k_h k_w, L]``) is the input seen through every kernel offset (im2col). The
unfolded input is built once per chunk of samples from one strided slice per offset (``F.unfold``
is slow on CPU) and shared by all backward passes; each pass is then one batched matmul per
chunk (per group when ``groups > 1``), squared (absolute for MAS) and summed over samples.
Chunks are cache-sized on a CPU, so the per-sample gradients are squared where they are made.
The bias gradient is :math:`\sum_L \delta_i`. Conv1d runs as a Conv2d of height 1.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .._util import chunk_budget, sample_chunks
from ..persample import power_of_
from . import layer_input, register_rule, sum_of_powers, trainable


def padded_2d(module: nn.Conv1d | nn.Conv2d, x: Tensor) -> Tensor:
    """The input, padded as the layer pads it, as ``[N, C_in, H, W]`` (a Conv1d input gets
    ``H = 1``); shared by the Fisher's conv rule and K-FAC's input factor."""
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    return x.unsqueeze(2) if isinstance(module, nn.Conv1d) else x


@register_rule(nn.Conv1d, nn.Conv2d)
def conv_rule(
    module: nn.Conv1d | nn.Conv2d,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    grad_outputs: list[Tensor],
    power: int = 2,
) -> dict[str, Tensor]:
    """Sum of per-sample gradient powers of ``weight`` and ``bias``."""
    out: dict[str, Tensor] = {}
    deltas = [d.flatten(2) for d in grad_outputs]  # [N, C_out, L]
    if trainable(module, "bias"):
        out["bias"] = sum_of_powers([d.sum(2) for d in deltas], power).sum(0)
    if not trainable(module, "weight"):
        return out
    one_d = isinstance(module, nn.Conv1d)

    def as_2d(v: tuple[int, ...]) -> tuple[int, ...]:
        return (1, *v) if one_d else v

    kernel, stride, dilation = (
        as_2d(v) for v in (module.kernel_size, module.stride, module.dilation)
    )
    height, width = as_2d(tuple(grad_outputs[0].shape[2:]))
    x = padded_2d(module, layer_input(args, kwargs))
    n, c_in = x.shape[:2]
    groups, c_out = module.groups, module.out_channels
    span = c_in // groups * kernel[0] * kernel[1]  # weight entries per output channel
    total = x.new_zeros(groups, c_out // groups, span)
    per_sample = (c_in * kernel[0] * kernel[1] * height * width + c_out * span) * x.element_size()
    for rows in sample_chunks(n, per_sample, chunk_budget(x.device)):
        seen = _unfolded(x[rows], kernel, stride, dilation, (height, width))
        seen = seen.view(-1, span, height * width).transpose(1, 2)  # [chunk * groups, L, span]
        for d in deltas:
            g = torch.bmm(d[rows].reshape(-1, c_out // groups, height * width), seen)
            total += power_of_(g, power).unflatten(0, (-1, groups)).sum(0)
    out["weight"] = total.reshape(module.weight.shape)
    return out


def _unfolded(
    x: Tensor,
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    size: tuple[int, int],
) -> Tensor:
    """im2col of a padded input ``x [N, C_in, H, W]``: ``[N, C_in, k_h * k_w, H_out, W_out]``,
    entry ``[:, c, u * k_w + v]`` the input seen through kernel offset ``(u, v)``."""
    height, width = size
    seen = x.new_empty(x.shape[0], x.shape[1], kernel[0] * kernel[1], height, width)
    for u in range(kernel[0]):
        for v in range(kernel[1]):
            top, left = u * dilation[0], v * dilation[1]
            seen[:, :, u * kernel[1] + v] = x[
                :,
                :,
                top : top + (height - 1) * stride[0] + 1 : stride[0],
                left : left + (width - 1) * stride[1] + 1 : stride[1],
            ]
    return seen
