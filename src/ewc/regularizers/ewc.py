"""EWC (Kirkpatrick et al., PNAS 2017) and online EWC (Schwarz et al., ICML 2018): the diagonal
Fisher of the task just learned as the importance."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ewc.fisher import KINDS as FISHER_KINDS
from ewc.fisher import fisher_diagonal
from ewc.fisher.batching import Forward
from ewc.fisher.core import check_flag
from ewc.fisher.likelihoods import resolve_likelihood
from ewc.regularizers.base import QuadraticRegularizer
from ewc.regularizers.checks import check_fisher_samples
from ewc.regularizers.registry import Strategy, register


class EWC(QuadraticRegularizer):
    r"""Elastic Weight Consolidation (Kirkpatrick et al., PNAS 2017).

    :math:`\Omega_t` = the diagonal Fisher at the end of task :math:`t`: the MEAN over samples of
    per-sample squared gradients of :math:`\log p(y\mid x)` (:func:`ewc.fisher.fisher_diagonal`).
    Default ``mode="separate"``: one penalty per old task, as in the paper, merged into one
    quadratic (module docstring).

    Args:
        model, lam, mode, gamma, state_dtype: see :class:`QuadraticRegularizer`.
        fisher: the Fisher kind, one of ``"exact"`` (expectation over the model's predictive
            distribution), ``"sampled"`` (one label drawn per sample, the paper's),
            ``"predicted"`` (the model's argmax label, van de Ven & Tolias 2019's code),
            ``"empirical"`` (true labels), ``"batched"`` (squared mini-batch gradients).
        fisher_samples: use at most this many samples for the Fisher (``None``: all).
        likelihood: ``"categorical"``, ``"bernoulli"`` (one logit per binary label),
            ``"gaussian"`` or a likelihood object.
        forward: ``forward(model, batch) -> (output, target)``; default ``model(x), y``.
        distributed: all-reduce the Fisher over ranks when a ``torch.distributed`` process
            group is initialised (default), so every rank holds the same penalty.
    """

    def __init__(
        self,
        model: nn.Module,
        lam: float,
        *,
        fisher: str = "exact",
        mode: str | None = None,
        gamma: float = 1.0,
        state_dtype: torch.dtype | None = None,
        fisher_samples: int | None = None,
        likelihood: Any = "categorical",
        forward: Forward | None = None,
        distributed: bool = True,
    ) -> None:
        if fisher not in FISHER_KINDS:
            raise ValueError(f"unknown fisher={fisher!r}; choose one of {', '.join(FISHER_KINDS)}.")
        check_fisher_samples(fisher_samples)
        resolve_likelihood(likelihood, fisher)  # an unknown likelihood fails here, not at the end
        super().__init__(model, lam, mode=mode, gamma=gamma, state_dtype=state_dtype)
        self.fisher = fisher
        self.fisher_samples = fisher_samples
        self.likelihood = likelihood
        self.forward = forward
        self.distributed = check_flag("distributed", distributed)

    def task_importance(self, batches: Iterable[Any] | None) -> dict[str, Tensor]:
        """The diagonal Fisher of the current model on ``batches`` (the task just learned)."""
        if batches is None:
            raise ValueError(
                f"{type(self).__name__}.consolidate() needs batches of the task just learned "
                "to estimate the Fisher; pass e.g. the task's training DataLoader."
            )
        return fisher_diagonal(
            self.model,
            batches,
            kind=self.fisher,
            likelihood=self.likelihood,
            n_samples=self.fisher_samples,
            forward=self.forward,
            distributed=self.distributed,
        )


class OnlineEWC(EWC):
    r"""Online EWC (Schwarz et al., ICML 2018, "Progress & compress"; Huszár 2018): EWC with
    ``mode="online"``, :math:`\bar F \leftarrow \gamma\bar F + F_t` and the anchor at the
    latest task's parameters. Arguments as :class:`EWC`, except ``mode``."""

    def __init__(self, model: nn.Module, lam: float, *, gamma: float = 1.0, **kwargs: Any) -> None:
        if "mode" in kwargs:
            raise ValueError("OnlineEWC is always mode='online'; use EWC(mode=...) for others.")
        super().__init__(model, lam, mode="online", gamma=gamma, **kwargs)


register(Strategy("ewc", EWC, 1e4, ("fisher",), uses_data=True))
register(Strategy("online-ewc", OnlineEWC, 1e4, ("fisher", "gamma"), uses_data=True))
