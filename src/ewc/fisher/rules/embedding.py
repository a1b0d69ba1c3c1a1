r"""``nn.Embedding``: the per-sample weight gradient adds the output-gradient of every position
into the row of its index, :math:`G_i[v] = \sum_{t: x_{i,t} = v} \delta_{i,t}`.

The rows touched by a sample are found as unique ``(sample, index)`` pairs; the segment sums are
squared (absolute for MAS) and added into ``[V, D]``, never materialising a ``[N, V, D]``
tensor. ``padding_idx`` gets no gradient. ``scale_grad_by_freq`` scales by in-batch counts,
which is not per-sample; it goes to the generic rule.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from . import generic_rule, layer_input, power_of, register_rule, trainable


@register_rule(nn.Embedding)
def embedding_rule(
    module: nn.Embedding,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    grad_outputs: list[Tensor],
    power: int = 2,
) -> dict[str, Tensor]:
    """Sum of per-sample gradient powers of ``weight [V, D]``."""
    if not trainable(module, "weight"):
        return {}
    if module.scale_grad_by_freq:
        return generic_rule(module, args, kwargs, grad_outputs, power)
    index = layer_input(args, kwargs)
    n, (vocab, dim) = index.shape[0], module.weight.shape
    sample = torch.arange(n, device=index.device).unsqueeze(1).expand(n, -1)
    flat_index = index.reshape(n, -1)
    keep = torch.ones_like(flat_index, dtype=torch.bool)
    if module.padding_idx is not None:
        keep = flat_index != module.padding_idx
    keys = (sample * vocab + flat_index)[keep]
    pairs, segment = torch.unique(keys, return_inverse=True)
    total = grad_outputs[0].new_zeros(vocab, dim)  # full-shape, also for an FSDP shard
    for d in grad_outputs:
        rows = d.reshape(n, -1, dim)[keep]
        sums = rows.new_zeros(pairs.shape[0], dim).index_add_(0, segment, rows)
        total.index_add_(0, pairs % vocab, power_of(sums, power))
    return {"weight": total}
