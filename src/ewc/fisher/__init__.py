r"""Diagonal Fisher information for Elastic Weight Consolidation.

``fisher_diagonal(model, batches, kind=..., likelihood=..., method=...)`` returns the mean over
samples of the per-sample squared gradient of :math:`\log p(y \mid x)`, one tensor per trainable
parameter. Kinds: ``"exact"``, ``"sampled"``, ``"predicted"``, ``"empirical"``, ``"batched"``
(biased).

The default method runs one batched forward and one backward per output-gradient and turns the
(input, output-gradient) pairs that hooks capture into sums of squared per-sample gradients
with one rule per layer type (:mod:`ewc.fisher.rules`; add your own with
:func:`register_rule`). ``method="loop"`` is the per-sample reference the rules are tested
against.
"""

from .core import KINDS, METHODS, fisher_diagonal
from .errors import FisherError
from .likelihoods import (
    BernoulliLikelihood,
    CategoricalLikelihood,
    GaussianLikelihood,
    Likelihood,
)
from .rules import Rule, register_rule

__all__ = [
    "KINDS",
    "METHODS",
    "BernoulliLikelihood",
    "CategoricalLikelihood",
    "FisherError",
    "GaussianLikelihood",
    "Likelihood",
    "Rule",
    "fisher_diagonal",
    "register_rule",
]
