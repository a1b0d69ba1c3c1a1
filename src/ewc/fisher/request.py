"""What one ``fisher_diagonal`` call computes, as handed to each method's per-batch function."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from .batching import Forward
from .likelihoods import Likelihood, SeededGenerator, output_grads


@dataclass(frozen=True)
class Request:
    """The model, its trainable parameters (by name), how to feed it, and the Fisher's kind.

    ``power``: what is summed per sample, :math:`|g_i|^p`: 2 for the Fisher (squares), 1 for
    MAS (absolute values, with the squared output norm as the "log-likelihood")."""

    model: nn.Module
    params: dict[str, Tensor]
    forward: Forward
    kind: str
    likelihood: Likelihood
    rng: SeededGenerator
    power: int = 2

    def output_grads(self, output: Tensor, target: Any) -> Iterator[Tensor]:
        """The output-gradients to backpropagate (see :func:`.likelihoods.output_grads`)."""
        return output_grads(self.likelihood, self.kind, output, target, self.rng)
