r"""The arithmetic of one merged quadratic :math:`\tfrac{\lambda}{2}\sum\Omega(\theta-a)^2`:
its autograd function (closed-form backward) and the merge of one task's quadratic into it
(:mod:`ewc.regularizers.base` has the math and the class that uses them)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class QuadraticPenalty(torch.autograd.Function):
    """:math:`\\tfrac{\\lambda}{2}\\sum\\Omega(\\theta-a)^2` with the closed-form backward
    :math:`\\lambda\\Omega(\\theta-a)`, saved from the forward: one multiply in backward instead
    of differentiating through sub/mul/sum. Under ``create_graph=True`` the backward is
    recomputed with differentiable ops, so Hessian-vector products see :math:`\\lambda\\Omega`."""

    @staticmethod
    def forward(
        ctx: Any, lam: float, omega: list[Tensor], anchor: list[Tensor], *params: Tensor
    ) -> Tensor:
        diff = torch._foreach_sub(list(params), anchor)
        weighted = torch._foreach_mul(diff, omega)
        value = torch.stack(
            [torch.dot(w.reshape(-1), d.reshape(-1)) for w, d in zip(weighted, diff, strict=True)]
        ).sum()
        ctx.lam, ctx.omega, ctx.anchor, ctx.n = lam, omega, anchor, len(params)
        ctx.save_for_backward(*weighted, *params)
        return value * (0.5 * lam)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        weighted, params = ctx.saved_tensors[: ctx.n], ctx.saved_tensors[ctx.n :]
        if torch.is_grad_enabled():  # create_graph=True: keep the backward differentiable
            weighted = torch._foreach_mul(torch._foreach_sub(list(params), ctx.anchor), ctx.omega)
        return (None, None, None, *torch._foreach_mul(list(weighted), grad_output * ctx.lam))


#: Elements merged at a time by :func:`merge_into`: its float64 temporaries stay a few MB
#: whatever the parameter's size (a 4096×4096 layer whole would take about 1 GB of them).
MERGE_CHUNK = 1 << 20


def merge_into(omega: Tensor, anchor: Tensor, f: Tensor, theta: Tensor) -> float:
    """Merge ``f·(θ - theta)²`` into ``omega·(θ - anchor)²`` in place (float64 arithmetic, in
    chunks of :data:`MERGE_CHUNK` elements); return the constant it adds:
    Σ omega·f/(omega+f)·(anchor - theta)²."""
    if not (omega.is_contiguous() and anchor.is_contiguous()):  # no flat view to write through
        return merge_chunk(omega, anchor, f, theta)
    flat = [omega.view(-1), anchor.view(-1), f.reshape(-1), theta.reshape(-1)]
    return sum(
        merge_chunk(*chunk) for chunk in zip(*(t.split(MERGE_CHUNK) for t in flat), strict=True)
    )


def merge_chunk(omega: Tensor, anchor: Tensor, f: Tensor, theta: Tensor) -> float:
    """One chunk of :func:`merge_into`, in place; its constant."""
    a, x, b, y = (t.double() for t in (omega, anchor, f, theta))
    total = a + b
    nonzero = total != 0
    safe = torch.where(nonzero, total, torch.ones_like(total))
    mean = torch.where(nonzero & (a != 0), (a * x + b * y) / safe, y)  # exactly θ on a first task
    constant = torch.where(nonzero, a * b / safe * (x - y).square(), torch.zeros_like(total))
    omega.copy_(total)
    anchor.copy_(mean)
    return float(constant.sum())
