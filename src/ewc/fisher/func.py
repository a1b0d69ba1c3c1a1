"""``method="func"``: whole-model per-sample gradients with ``torch.func``.

``vmap`` over samples of a ``vjp`` of the model (through ``forward``), in chunks of samples. It
handles any batch-first model that ``torch.func`` can transform, including weight sharing and
parameters used outside their module, at the price of per-sample gradients of the whole model.
Output-gradients come from one batched forward, so sampled targets match the other methods.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._util import accumulate, byte_groups
from .batching import ForwardModule, call_forward
from .persample import per_sample_grad_powers
from .request import Request


def func_batch(request: Request, batch: Any) -> tuple[dict[str, Tensor], int]:
    """Sums of per-sample gradient powers over one batch, and its number of samples."""
    with torch.no_grad():
        output, target, n = call_forward(request.forward, request.model, batch)
    wrapper = ForwardModule(request.model, request.forward)
    wrapped = {f"model.{name}": p for name, p in request.params.items()}
    sums: dict[str, Tensor] = {}
    for group in byte_groups(request.output_grads(output, target), lambda v: v.nbytes):
        part = per_sample_grad_powers(wrapper, wrapped, ((batch,), {}), group, n, request.power)
        accumulate(sums, {name.removeprefix("model."): v for name, v in part.items()})
    return sums, n
