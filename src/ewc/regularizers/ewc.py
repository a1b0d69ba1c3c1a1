"""EWC (Kirkpatrick et al., PNAS 2017) and online EWC (Schwarz et al., ICML 2018): the diagonal
Fisher of the task just learned as the importance."""

from __future__ import annotations

import copy
import json
import time
import warnings
from collections.abc import Iterable, Mapping
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
from ewc.regularizers.scale import (
    Probe,
    WeakPenaltyWarning,
    check_normalize,
    check_stats,
    confidence,
    importance_scale,
    normalizer,
    rewrite_costs,
    strength,
    weak_penalty_message,
)


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
        normalize: ``None`` (default: the Fisher as it is), ``"mean"`` or ``"max"``: each
            task's Fisher divided by its mean (or max) over all regularized entries before it is
            merged; ``"rewrite"``: scaled so that at λ = 1 half of the weights cost one nat or
            more of penalty to move to zero. For a λ that means the same on models of other
            sizes and confidence (:mod:`ewc.regularizers.scale`; docs/results.md, "λ across
            models", measures which does).

    Each :meth:`consolidate` appends to :attr:`stats` the Fisher's scale (overall and per
    parameter: mean, max, quantiles; before normalisation), the ``normalizer`` it was divided
    by, per parameter (``rewrite``) the cost (the merged penalty per unit of λ of moving its
    entries to zero), the fraction of entries ``unprotected`` at this λ and the λ that protects
    half of them (``lam_half``, on the normalised scale), the model's ``confidence`` on the
    consolidation data (mean max-probability and entropy) and ``probe_s``, the seconds that
    took; it warns (:class:`~ewc.regularizers.scale.WeakPenaltyWarning`) when the penalty cannot
    matter (:mod:`ewc.regularizers.scale` says how that is decided).
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
        normalize: str | None = None,
    ) -> None:
        if fisher not in FISHER_KINDS:
            raise ValueError(f"unknown fisher={fisher!r}; choose one of {', '.join(FISHER_KINDS)}.")
        check_fisher_samples(fisher_samples)
        resolve_likelihood(likelihood, fisher)  # an unknown likelihood fails here, not at the end
        check_normalize(normalize)
        super().__init__(model, lam, mode=mode, gamma=gamma, state_dtype=state_dtype)
        self.fisher = fisher
        self.fisher_samples = fisher_samples
        self.likelihood = likelihood
        self.forward = forward
        self.distributed = check_flag("distributed", distributed)
        self.normalize = normalize
        #: One dict per task merged (see the class docstring); plain numbers and strings.
        self.stats: list[dict[str, Any]] = []

    def consolidate(self, batches: Iterable[Any] | None = None) -> None:
        """End of a task: the Fisher on ``batches``, merged (normalised as ``normalize`` says)
        with the current parameters as anchor; then its :attr:`stats` completed from the first
        :data:`~ewc.regularizers.scale.PROBE_SAMPLES` samples, and the strength checked."""
        probe = None if batches is None else Probe(batches)
        super().consolidate(probe)
        assert probe is not None  # task_importance refused None
        tic = time.perf_counter()
        likelihood = resolve_likelihood(self.likelihood, self.fisher)
        stats = self.stats[-1]
        # Under FSDP a forward is collective and the ranks keep different probes: not measured.
        if not self._sharded:
            stats["confidence"] = confidence(self.model, probe.kept, self.forward, likelihood)
        stats["probe_s"] = time.perf_counter() - tic
        message = weak_penalty_message(type(self).__name__, self.lam, stats)
        if message is not None:
            warnings.warn(message, WeakPenaltyWarning, stacklevel=2)

    def add_task(
        self, importance: Mapping[str, Tensor], anchor: Mapping[str, Tensor] | None = None
    ) -> None:
        """Merge one task's Fisher (see :meth:`QuadraticRegularizer.add_task`), divided first
        as ``normalize`` says; its scale is appended to :attr:`stats`."""
        self._follow_model()
        names = self._names
        aligned = self._aligned(importance, "importance", partial=True)
        importance = dict(zip(names, aligned, strict=True))
        at = (
            [p.detach() for p in self._params]
            if anchor is None
            else self._aligned(anchor, "anchor", partial=False)
        )
        anchor_t = dict(zip(names, at, strict=True))
        scale = importance_scale(importance)
        divisor = normalizer(importance, self.normalize, anchor_t)
        if divisor != 1.0:
            importance = {n: f / divisor for n, f in importance.items()}
        super().add_task(importance, anchor)
        costs = rewrite_costs(self.importance, self.anchor)
        sizes = {n: p.numel() for n, p in zip(self._names, self._params, strict=True)}
        self.stats.append(
            {
                "task": self.n_tasks - 1,
                "normalize": self.normalize,
                "normalizer": divisor,
                "fisher_mean": scale["mean"],
                "fisher_max": scale["max"],
                **strength(self.lam, costs, sizes),
                "layers": scale["layers"],
                "rewrite": costs,
                "confidence": None,  # consolidate() reads it from the data
                "probe_s": 0.0,
            }
        )

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

    def state_dict(self) -> dict[str, Any]:
        """:meth:`QuadraticRegularizer.state_dict` with ``normalize`` and ``stats``, the latter
        as one JSON string (a list of any length would not fit the fixed key layout that
        ``torch.distributed.checkpoint`` loads into)."""
        state = super().state_dict()
        state["normalize"] = self.normalize
        state["stats"] = json.dumps(self.stats)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """:meth:`QuadraticRegularizer.load_state_dict`, restoring ``normalize`` and ``stats``
        too; a state saved before they existed loads as ``normalize=None`` (the raw Fisher it
        holds) with no stats."""
        if isinstance(state, Mapping):
            state = {"normalize": None, "stats": None, **state}  # None: saved before stats
            state["stats"] = _parsed_stats(state["stats"])
        super().load_state_dict(state)
        self.normalize = state["normalize"]
        self.stats = copy.deepcopy(state["stats"] or [])

    def _check_extra_state(self, state: Mapping[str, Any]) -> None:
        try:
            check_normalize(state["normalize"])
        except ValueError as e:
            raise ValueError(f"state dict 'normalize': {e}") from None
        n_tasks = state["n_tasks"]
        if state["stats"] is not None and isinstance(n_tasks, int):
            problem = check_stats(state["stats"], self._names, n_tasks)
            if problem is not None:
                raise ValueError(f"state dict 'stats': {problem}.")


def _parsed_stats(stats: Any) -> Any:
    """A state dict's ``stats``: the JSON string :meth:`EWC.state_dict` writes, parsed (other
    values are left for :func:`~ewc.regularizers.scale.check_stats` to judge)."""
    if not isinstance(stats, str):
        return stats
    try:
        return json.loads(stats)
    except ValueError:
        raise ValueError("state dict 'stats' is not the JSON that state_dict() writes.") from None


class OnlineEWC(EWC):
    r"""Online EWC (Schwarz et al., ICML 2018, "Progress & compress"; Huszár 2018): EWC with
    ``mode="online"``, :math:`\bar F \leftarrow \gamma\bar F + F_t` and the anchor at the
    latest task's parameters. Arguments as :class:`EWC`, except ``mode``."""

    def __init__(self, model: nn.Module, lam: float, *, gamma: float = 1.0, **kwargs: Any) -> None:
        if "mode" in kwargs:
            raise ValueError("OnlineEWC is always mode='online'; use EWC(mode=...) for others.")
        super().__init__(model, lam, mode="online", gamma=gamma, **kwargs)


register(Strategy("ewc", EWC, 1e4, ("fisher", "normalize"), uses_data=True))
register(Strategy("online-ewc", OnlineEWC, 1e4, ("fisher", "gamma", "normalize"), uses_data=True))
