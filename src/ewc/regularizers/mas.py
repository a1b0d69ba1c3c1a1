"""Memory Aware Synapses (Aljundi et al., ECCV 2018): per-sample absolute gradients of the
output's squared norm, computed by the Fisher's machinery."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ewc.fisher.batching import Forward, default_forward
from ewc.fisher.core import check_flag, sample_mean
from ewc.fisher.likelihoods import CategoricalLikelihood, SeededGenerator
from ewc.fisher.request import Request
from ewc.regularizers.base import QuadraticRegularizer
from ewc.regularizers.registry import Strategy, register

#: How MAS computes its per-sample gradients (as :func:`ewc.fisher_diagonal`'s ``method``).
METHODS = ("auto", "hooks", "func")


class MAS(QuadraticRegularizer):
    r"""Memory Aware Synapses (Aljundi et al., ECCV 2018).

    :math:`\Omega_t = \frac1N\sum_{k=1}^N\big|\partial\,\|f(x_k)\|_2^2/\partial\theta\big|`, the
    paper's definition: per-sample absolute gradients of the squared L2 norm of the output
    (``forward(model, batch)[0]`` if ``forward`` is given; targets are not used, so unlabeled
    data works). Not the absolute value of a mini-batch gradient, as some implementations take:
    :math:`|\sum_k g_k| \le \sum_k |g_k|`, with equality only where the signs agree.

    Computed by the Fisher's machinery (:func:`ewc.fisher.core.sample_mean`) with absolute
    values in place of squares: hooks and per-layer rules (Linear: one matmul
    :math:`|\delta|^\top|a|` over the batch), a per-sample ``torch.func`` vjp for layers without
    a rule, and the whole-model ``vmap`` where hooks cannot split the model. The model is
    evaluated in eval mode (restored afterwards) and no ``.grad`` is touched. Default
    ``mode="online"``, ``gamma=1``: importance accumulated over tasks, anchor at the latest
    parameters, as in the paper.

    Every tensor in a batch whose first dimension equals the batch size is split per sample;
    other leaves are shared by all samples (see :mod:`ewc.fisher.batching`).

    Args:
        model, lam, mode, gamma, state_dtype: see :class:`QuadraticRegularizer`.
        forward: ``forward(model, batch) -> (output, target)``; default ``model(x), y``.
        method: ``"auto"`` (hooks, switching to ``"func"`` where they cannot split the model),
            ``"hooks"`` or ``"func"``, as in :func:`ewc.fisher_diagonal`.
        distributed: all-reduce over ranks under ``torch.distributed``, as :class:`EWC`.
    """

    default_mode = "online"

    def __init__(
        self,
        model: nn.Module,
        lam: float,
        *,
        forward: Forward | None = None,
        mode: str | None = None,
        gamma: float = 1.0,
        state_dtype: torch.dtype | None = None,
        method: str = "auto",
        distributed: bool = True,
    ) -> None:
        super().__init__(model, lam, mode=mode, gamma=gamma, state_dtype=state_dtype)
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not one of {list(METHODS)}; pass one.")
        self.forward = forward
        self.method = method
        self.distributed = check_flag("distributed", distributed)

    def task_importance(self, batches: Iterable[Any] | None) -> dict[str, Tensor]:
        """Mean per-sample :math:`|\\nabla_\\theta\\|f(x)\\|^2|` over ``batches``."""
        if batches is None:
            raise ValueError(
                "MAS.consolidate() needs batches of the task just learned (labels unused); "
                "pass e.g. the task's training DataLoader."
            )
        params = {n: p for n, p in zip(self._names, self._params, strict=True) if p.requires_grad}
        request = _OutputNormRequest(
            self.model,
            params,
            self.forward or default_forward,
            kind="empirical",
            likelihood=CategoricalLikelihood(),  # unused: output_grads is overridden
            rng=SeededGenerator(0),  # unused: nothing is sampled
            power=1,
        )
        return sample_mean(
            request, batches, self.method, what="MAS importance", distributed=self.distributed
        )


@dataclass(frozen=True)
class _OutputNormRequest(Request):
    """MAS as a request to the Fisher machinery: the gradient of :math:`\\sum_i\\|f(x_i)\\|^2`
    at the output is :math:`2f(x_i)`, one backward pass; ``power=1`` sums absolute values."""

    def output_grads(self, output: Tensor, target: Any) -> Iterator[Tensor]:
        return iter([2 * output.detach()])


register(Strategy("mas", MAS, 0.1, uses_data=True))
