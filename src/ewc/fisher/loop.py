"""``method="loop"``: the plain per-sample reference (one forward and backward per sample).

Slow and obviously right: each sample is cut from the batch, fed through ``forward`` alone, and
its parameter gradients come from ``torch.autograd.grad`` of :math:`\\log p(y \\mid x)` itself
(``"empirical"``, ``"sampled"``, ``"predicted"``) or of the output against each of
``likelihood.exact_output_grads`` (``"exact"``). Sampled (or predicted) targets come once per
batch from the batch's outputs, exactly as the fast methods draw them, so all methods agree for
a seed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .batching import batch_size, call_forward, take
from .likelihoods import checked_log_prob, exact_output_grads, model_target
from .persample import power_of
from .request import Request


def loop_batch(request: Request, batch: Any) -> tuple[dict[str, Tensor], int]:
    """Sums of per-sample gradient powers over one batch, and its number of samples."""
    model, forward, likelihood = request.model, request.forward, request.likelihood
    params = list(request.params.values())
    n = batch_size(batch)
    sampled = None
    if request.kind in ("sampled", "predicted"):
        with torch.no_grad():
            output, target, _ = call_forward(forward, model, batch)
        sampled = model_target(likelihood, request.kind, output, request.rng, target)
    sums = [torch.zeros_like(p) for p in params]
    for i in range(n):
        output, target, _ = call_forward(forward, model, take(batch, n, slice(i, i + 1)))
        roots: list[tuple[Tensor, Tensor | None]]
        if request.kind == "exact":
            roots = [(output, v) for v in exact_output_grads(likelihood, output.detach(), target)]
        else:
            y = target if sampled is None else sampled[i : i + 1]
            roots = [(checked_log_prob(likelihood, output, y).sum(), None)]
        for root, v in roots:
            grads = torch.autograd.grad(root, params, v, retain_graph=True, allow_unused=True)
            for s, g in zip(sums, grads, strict=True):
                if g is not None:
                    s += power_of(g, request.power)
    return dict(zip(request.params, sums, strict=True)), n
