r"""Normalisation layers: ``BatchNorm{1,2,3}d`` (eval, running statistics), ``GroupNorm``,
``LayerNorm``.

All compute :math:`y = \hat x \odot w + b` with :math:`\hat x` the normalised input, so the
per-sample gradients are :math:`g_w = \sum \delta \odot \hat x` and :math:`g_b = \sum \delta`,
summed over the positions that share a weight (spatial positions for the channel-wise norms,
leading positions for LayerNorm). :math:`\hat x` is recomputed with the same functional kernel
and no affine parameters. (A BatchNorm without running statistics mixes samples even in eval
mode; :func:`~ewc.fisher.fisher_diagonal` refuses it.)
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from . import layer_input, register_rule, sum_of_powers, trainable


def _channelwise(t: Tensor) -> Tensor:
    """``[N, C, *]`` summed over positions: ``[N, C]``."""
    return t.flatten(2).sum(2) if t.ndim > 2 else t


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)
def norm_rule(
    module: _BatchNorm | nn.GroupNorm | nn.LayerNorm,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    grad_outputs: list[Tensor],
    power: int = 2,
) -> dict[str, Tensor]:
    """Sum of per-sample gradient powers of ``weight`` and ``bias``."""
    x = layer_input(args, kwargs)
    if isinstance(module, _BatchNorm):
        xhat = F.batch_norm(
            x, module.running_mean, module.running_var, training=False, eps=module.eps
        )
        reduce = _channelwise
    elif isinstance(module, nn.GroupNorm):
        xhat = F.group_norm(x, module.num_groups, eps=module.eps)
        reduce = _channelwise
    else:
        shape = tuple(module.normalized_shape)
        xhat = F.layer_norm(x, shape, eps=module.eps)

        def reduce(t: Tensor) -> Tensor:
            return t.reshape(t.shape[0], -1, *shape).sum(1)

    out: dict[str, Tensor] = {}
    if trainable(module, "weight"):
        out["weight"] = sum_of_powers([reduce(d * xhat) for d in grad_outputs], power).sum(0)
    if trainable(module, "bias"):
        out["bias"] = sum_of_powers([reduce(d) for d in grad_outputs], power).sum(0)
    return out
