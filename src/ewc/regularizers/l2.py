"""L2: uniform importance, the plain weight-space distance to the old solutions."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ewc.regularizers.base import QuadraticRegularizer
from ewc.regularizers.registry import Strategy, register


class L2(QuadraticRegularizer):
    r"""Uniform importance :math:`\Omega_t = 1` for every parameter.

    Default ``mode="separate"``: the exact sum :math:`\tfrac{\lambda}{2}\sum_t\|\theta-\theta^*_t
    \|^2`, i.e. after :math:`t` tasks weight :math:`t` at the MEAN of the old solutions (plus a
    constant). For the other common baseline, "anchor at the previous task, weight 1", use
    ``mode="online"`` with a small ``gamma`` (weight :math:`1+\gamma+\dots`) — or note that
    ``gamma=1`` gives weight :math:`t` at the latest solution.
    """

    def task_importance(self, batches: Iterable[Any] | None) -> dict[str, Tensor]:
        """Ones; ``batches`` are not needed and ignored."""
        return {n: torch.ones_like(p) for n, p in zip(self._names, self._params, strict=True)}


register(Strategy("l2", L2, 1e-3))
