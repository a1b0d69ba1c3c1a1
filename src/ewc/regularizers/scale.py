r"""How strong a Fisher penalty is: the importance's scale per layer, the model's confidence on
the consolidation data, the check that warns when the penalty cannot matter, and the
normalisations that give λ one meaning across models.

Why λ does not carry over
-------------------------
The diagonal Fisher of a categorical model at an input is :math:`J^\top(\operatorname{diag}(p)
- pp^\top)J` (:math:`J` the Jacobian of the logits): it vanishes as the model becomes certain
(:math:`p` one-hot), and it grows or shrinks with the model's width through :math:`J`. So the
λ that holds one model's old task does nothing on a wider or a more confident one.

The strength check (what the warning measures)
----------------------------------------------
The penalty can only hold what it makes expensive to change. For each regularized parameter
tensor :math:`l`, its *rewrite cost* is the penalty of moving every entry by its own size (to
zero): :math:`c_l = \tfrac{\lambda}{2}\sum_{i\in l}\bar\Omega_i\bar\theta_i^2`, in nats. A new
task whose loss falls by a nat or more per sample by rewriting tensor :math:`l` pays less than
that in penalty when :math:`c_l < 1`: the tensor is *unprotected*. When unprotected tensors hold
more than half of the regularized entries (:data:`UNPROTECTED_FRACTION`), the penalty cannot
matter: :class:`WeakPenaltyWarning` says so, with the cause (the Fisher's scale, the model's
confidence on the consolidation data) and the remedy: the λ at which half of the entries are
protected (the median, weighted by entries, of :math:`2/\sum_{i\in l}\bar\Omega_i\bar\theta_i^2`),
or ``normalize="mean"`` with that λ on the normalised scale. Why per tensor and not overall: a
near-certain transformer's Fisher is 1e-5 to 1e-10 times smaller in its encoder than in its
head, and Adam moves every weight at the same rate whatever its gradient's scale, so a λ that
pins the head leaves the encoder free and the old task is lost all the same
(docs/results.md, "λ across models", measured on a tiny BERT and the seed experiment).

The confidence costs one no-grad forward over at most :data:`PROBE_SAMPLES` samples, the first
batches the Fisher already read; the check itself is a sum over the parameters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ewc.fisher._util import eval_mode
from ewc.fisher.batching import Forward, batch_size, default_forward, to_device
from ewc.fisher.likelihoods import BernoulliLikelihood, CategoricalLikelihood, Likelihood

__all__ = [
    "NORMALIZATIONS",
    "PROBE_SAMPLES",
    "QUANTILES",
    "UNPROTECTED_FRACTION",
    "Probe",
    "WeakPenaltyWarning",
    "check_normalize",
    "confidence",
    "importance_scale",
    "normalizer",
    "rewrite_costs",
    "strength",
    "weak_penalty_message",
]

#: ``normalize`` options: the Fisher of each task divided, before it is merged, by its mean
#: (``"mean"``) or its maximum (``"max"``) over every regularized parameter entry.
NORMALIZATIONS = ("mean", "max")
#: Samples of the consolidation data read for the confidence.
PROBE_SAMPLES = 256
#: The penalty cannot matter when tensors it makes cheaper than 1 nat to rewrite hold more than
#: this fraction of the regularized entries (module docstring).
UNPROTECTED_FRACTION = 0.5
#: The quantiles of each layer's importance recorded at consolidation.
QUANTILES = (0.5, 0.9, 0.99)
#: ``torch.quantile`` reads at most this many entries; larger layers are read with a stride.
_MAX_QUANTILE_ENTRIES = 2**24


class WeakPenaltyWarning(UserWarning):
    """The penalty is too weak to hold the old task (see :mod:`ewc.regularizers.scale`)."""


def check_normalize(normalize: Any) -> str | None:
    """``normalize`` if it is ``None`` or one of :data:`NORMALIZATIONS`; else ``ValueError``."""
    if normalize is not None and normalize not in NORMALIZATIONS:
        raise ValueError(
            f"unknown normalize={normalize!r}; choose one of {', '.join(NORMALIZATIONS)} "
            "(or None: the raw Fisher)."
        )
    return normalize


def normalizer(importance: Mapping[str, Tensor], normalize: str | None) -> float:
    """What ``normalize`` divides the importance by: its mean or max over all entries (1 for
    ``None``, or for an importance that is zero everywhere)."""
    if normalize is None:
        return 1.0
    scale = importance_scale(importance)[normalize]
    return scale if scale > 0 else 1.0


@torch.no_grad()
def importance_scale(importance: Mapping[str, Tensor]) -> dict[str, Any]:
    """The scale of an importance dict, in its own units (1/θ² for a Fisher): ``mean`` and
    ``max`` over every entry, and per parameter (``layers``) its ``mean``, ``max`` and the
    :data:`QUANTILES` as ``q50``, ``q90``, ``q99`` (computed in float64; a parameter over
    2**24 entries is read with an even stride for its quantiles)."""
    layers: dict[str, dict[str, float]] = {}
    total, count, top = 0.0, 0, -math.inf
    for name, value in importance.items():
        v = value.detach().reshape(-1).double()
        if v.numel() == 0:
            continue
        stride = math.ceil(v.numel() / _MAX_QUANTILE_ENTRIES)
        q = torch.quantile(v[::stride], torch.tensor(QUANTILES, dtype=v.dtype, device=v.device))
        layer = {"mean": float(v.mean()), "max": float(v.max())}
        layer |= {f"q{round(100 * p)}": float(x) for p, x in zip(QUANTILES, q, strict=True)}
        layers[name] = layer
        total += float(v.sum())
        count += v.numel()
        top = max(top, layer["max"])
    return {"mean": total / max(count, 1), "max": top if count else 0.0, "layers": layers}


class Probe:
    """Iterate over ``batches`` once, keeping the first batches that hold ``n`` samples, so
    that the consolidation data can be read again after a one-pass iterable (a progress bar, a
    generator) is spent."""

    def __init__(self, batches: Iterable[Any], n: int = PROBE_SAMPLES) -> None:
        self._batches, self._n = batches, n
        self.kept: list[Any] = []

    def __iter__(self) -> Iterator[Any]:
        kept = 0
        for batch in self._batches:
            if kept < self._n:
                self.kept.append(batch)
                kept += batch_size(batch)
            yield batch


@torch.no_grad()
def confidence(
    model: nn.Module, batches: Iterable[Any], forward: Forward | None, likelihood: Likelihood
) -> dict[str, float] | None:
    """The model's confidence on ``batches``: the mean over labelled positions of its largest
    predicted probability (``max_prob``) and of its predictive entropy in nats (``entropy``),
    in eval mode. For categorical likelihoods (over the last dimension; targets equal to
    ``ignore_index`` skipped) and Bernoulli ones (per output entry); ``None`` for others."""
    if not isinstance(likelihood, CategoricalLikelihood | BernoulliLikelihood):
        return None
    forward = forward or default_forward
    device = next(model.parameters()).device
    max_prob = entropy = 0.0
    count = 0
    with eval_mode(model):
        for batch in batches:
            output, target = forward(model, to_device(batch, device))
            output = output.detach().double()
            if isinstance(likelihood, CategoricalLikelihood):
                log_p = torch.log_softmax(output, dim=-1)
                keep = target != likelihood.ignore_index
                top = log_p.max(-1).values.exp()
                ent = -torch.special.xlogy(log_p.exp(), log_p.exp()).sum(-1)
            else:
                p = torch.sigmoid(output)
                keep = torch.ones_like(p, dtype=torch.bool)
                top = torch.maximum(p, 1 - p)
                ent = -(torch.special.xlogy(p, p) + torch.special.xlogy(1 - p, 1 - p))
            max_prob += float(top[keep].sum())
            entropy += float(ent[keep].sum())
            count += int(keep.sum())
    if count == 0:
        return None
    return {"max_prob": max_prob / count, "entropy": entropy / count}


@torch.no_grad()
def rewrite_costs(
    importance: Mapping[str, Tensor], anchor: Mapping[str, Tensor]
) -> dict[str, float]:
    r"""Per parameter tensor, :math:`\tfrac12\sum_i\Omega_i\theta_i^2` (float64): the
    penalty, per unit of λ, of moving every entry from the anchor to zero (module docstring)."""
    return {
        n: 0.5 * float((f.double() * anchor[n].double().square()).sum())
        for n, f in importance.items()
    }


def strength(lam: float, costs: Mapping[str, float], sizes: Mapping[str, int]) -> dict[str, float]:
    """``unprotected``: the fraction of entries (``sizes``: entries per tensor) in tensors with
    ``lam * cost < 1`` nat; ``lam_half``: the λ that protects half of the entries (the
    entry-weighted median of ``1 / cost``; ``inf`` when the importance is zero in too many)."""
    total = sum(sizes.values())
    unprotected = sum(sizes[n] for n, c in costs.items() if lam * c < 1.0) / max(total, 1)
    needed = sorted((1.0 / c if c > 0 else math.inf, sizes[n]) for n, c in costs.items())
    seen, lam_half = 0, math.inf
    for value, size in needed:
        seen += size
        if seen >= total / 2:
            lam_half = value
            break
    return {"unprotected": unprotected, "lam_half": lam_half}


def weak_penalty_message(name: str, lam: float, stats: Mapping[str, Any]) -> str | None:
    """The warning for one consolidation's ``stats`` (``unprotected``, ``lam_half``,
    ``fisher_mean``, ``normalizer``, ``normalize``, ``confidence``) when more than
    :data:`UNPROTECTED_FRACTION` of the entries are unprotected; else ``None`` (also for
    λ = 0, no penalty on purpose)."""
    if lam == 0 or stats["unprotected"] <= UNPROTECTED_FRACTION:
        return None
    conf = stats.get("confidence")
    if conf is not None and conf["max_prob"] >= 0.99:
        cause = (
            f"the Fisher vanished because the model is near-certain on the consolidation data "
            f"(mean Fisher = {stats['fisher_mean']:.3g}, mean max-probability = "
            f"{conf['max_prob']:.6f}, mean entropy = {conf['entropy']:.3g} nats)"
        )
    else:
        held = "" if conf is None else f", mean max-probability = {conf['max_prob']:.3f}"
        cause = f"λ is small for this model's Fisher (mean = {stats['fisher_mean']:.3g}{held})"
    fix = f"a λ around {stats['lam_half']:.0e}"
    if stats["normalize"] is None:  # the mean-normalised Fisher's costs are 1/mean(F) times these
        normalized = stats["lam_half"] * stats["fisher_mean"]
        fix = f"normalize='mean' with λ around {normalized:.0e}, or {fix}"
    return (
        f"{name}: the penalty cannot matter: at λ = {lam:.3g}, moving the weights of tensors "
        f"holding {100 * stats['unprotected']:.0f}% of the regularized entries all the way to "
        f"zero costs less than 1 nat of penalty; {cause}. Use {fix} (where half of the entries "
        "are protected); see ewc.regularizers.scale."
    )
