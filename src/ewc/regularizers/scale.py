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
zero): :math:`c_l = \tfrac{\lambda}{2}\sum_{i\in l}\bar\Omega_i\bar\theta_i^2`, in nats; the
tensor is *protected* when :math:`c_l \ge 1` (a new task must give up a nat of penalty or more to
rewrite it). :math:`\lambda_{1/2}` is the λ at which tensors holding half of the regularized
entries are protected (the entry-weighted median of :math:`2/\sum_{i\in l}\bar\Omega_i
\bar\theta_i^2`). Measured (docs/results.md, "λ across models") on three architectures whose
best raw λ differ by eight decades (a tiny BERT fine-tuned to near-certainty, the seed
experiment's CNN, MLPs on permuted digits), the best λ lay at 0.5 to 30 :math:`\lambda_{1/2}`,
and every λ below :math:`\lambda_{1/2}/10` left the old task within 3 points of no penalty at
all. So :class:`WeakPenaltyWarning` fires when the model is near-certain (mean max-probability
>= :data:`CERTAIN`, 0.99: the issue's case, where the Fisher vanishes) and :math:`\lambda <
\lambda_{1/2}/` :data:`WEAK_MARGIN` (10): then even ten times this λ would leave most weights
free, and the penalty cannot matter. It names the cause and the remedy (λ from
:math:`\lambda_{1/2}` to :math:`10\lambda_{1/2}`, or ``normalize="rewrite"``, which puts
:math:`\lambda_{1/2}` at 1). Only for near-certain models: examples/hf_two_tasks.py's BERT,
trained on labels with noise (mean max-probability 0.55), keeps its task A at λ = λ½/160, so on
an unsure model a λ far below λ½ can still work, and nothing is said.

Why per tensor and not overall: a near-certain transformer's Fisher is 1e-7 to 1e-10 times
smaller in its encoder than in its head, and Adam moves every weight at the same rate whatever
its gradient's scale, so a λ that pins the head leaves the encoder free and the old task is lost
all the same.

The confidence costs one no-grad forward over at most :data:`PROBE_SAMPLES` samples, the first
batches the Fisher already read; the check itself is a sum over the parameters.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ewc import fsdp
from ewc.fisher._util import eval_mode
from ewc.fisher.batching import Forward, batch_size, default_forward, take, to_device
from ewc.fisher.likelihoods import BernoulliLikelihood, CategoricalLikelihood, Likelihood

__all__ = [
    "CERTAIN",
    "NORMALIZATIONS",
    "PROBE_SAMPLES",
    "QUANTILES",
    "WEAK_MARGIN",
    "Probe",
    "WeakPenaltyWarning",
    "check_normalize",
    "check_stats",
    "confidence",
    "importance_scale",
    "normalizer",
    "rewrite_costs",
    "strength",
    "weak_penalty_message",
]

#: ``normalize`` options: the Fisher of each task divided, before it is merged, by its mean
#: (``"mean"``) or its maximum (``"max"``) over every regularized parameter entry, or scaled so
#: that λ = 1 protects half of the entries (``"rewrite"``: multiplied by that task's λ½, see
#: :func:`strength`; λ then counts multiples of the strength at which half of the weights cost
#: one nat or more to rewrite).
NORMALIZATIONS = ("mean", "max", "rewrite")
#: Samples of the consolidation data read for the confidence.
PROBE_SAMPLES = 256
#: The penalty cannot matter when the model is near-certain (its mean max-probability on the
#: consolidation data at least :data:`CERTAIN`) and λ is below λ½ (the λ that protects half of
#: the regularized entries, :func:`strength`) divided by :data:`WEAK_MARGIN` (module docstring).
CERTAIN = 0.99
WEAK_MARGIN = 10.0
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


#: The keys of one task's stats (``EWC.stats``) and of their nested dicts.
STAT_KEYS = frozenset(
    {"task", "normalize", "normalizer", "fisher_mean", "fisher_max", "unprotected", "lam_half"}
    | {"layers", "rewrite", "confidence", "probe_s"}
)
LAYER_KEYS = frozenset({"mean", "max", *(f"q{round(100 * q)}" for q in QUANTILES)})
#: A layer's keys under FSDP: no quantiles (a rank holds only its shard of the parameter).
SHARDED_LAYER_KEYS = frozenset({"mean", "max"})
CONFIDENCE_KEYS = frozenset({"max_prob", "entropy"})


def check_stats(stats: Any, names: Iterable[str], n_tasks: int) -> str | None:
    """What is wrong with ``stats`` as the stats of ``n_tasks`` consolidations of a model with
    parameters ``names`` (one dict per task, the keys of :data:`STAT_KEYS`, numbers where
    numbers go), or ``None``."""
    names = set(names)
    if not isinstance(stats, list) or len(stats) != n_tasks:
        return f"should be a list of {n_tasks} dicts (one per task)"

    def numbers(d: Any, keys: frozenset[str]) -> bool:
        return isinstance(d, dict) and set(d) == keys and all(type(d[k]) is float for k in keys)

    for t, entry in enumerate(stats):
        if not isinstance(entry, dict) or set(entry) != STAT_KEYS:
            return f"task {t}: should be a dict with keys {sorted(STAT_KEYS)}"
        scalars = STAT_KEYS - {"task", "normalize", "layers", "rewrite", "confidence"}
        layers, rewrite, conf = entry["layers"], entry["rewrite"], entry["confidence"]
        if (
            entry["task"] != t
            or type(entry["task"]) is not int
            or (entry["normalize"] is not None and entry["normalize"] not in NORMALIZATIONS)
            or not numbers({k: entry[k] for k in scalars}, frozenset(scalars))
            or not (isinstance(layers, dict) and set(layers) == names)
            or not all(
                numbers(v, LAYER_KEYS) or numbers(v, SHARDED_LAYER_KEYS) for v in layers.values()
            )
            or not numbers(rewrite, frozenset(names))
            or not (conf is None or numbers(conf, CONFIDENCE_KEYS))
        ):
            return f"task {t}: a value is missing or of the wrong type"
    return None


def normalizer(
    importance: Mapping[str, Tensor], normalize: str | None, anchor: Mapping[str, Tensor]
) -> float:
    """What ``normalize`` divides one task's importance by: its mean or max over all entries,
    or for ``"rewrite"`` the reciprocal of the λ that protects half of the entries (at the
    task's ``anchor``; :func:`strength`). 1 for ``None``, and where that is 0 or undefined (an
    importance zero everywhere, or in more than half of the entries for ``"rewrite"``)."""
    if normalize is None or not any(f.numel() for f in importance.values()):
        return 1.0
    if normalize == "rewrite":
        sizes = {n: f.numel() for n, f in importance.items()}
        scale = 1.0 / strength(1.0, rewrite_costs(importance, anchor), sizes)["lam_half"]
    else:
        total, count, top = _totals(importance.values())
        scale = total / count if normalize == "mean" else top
    return scale if 0 < scale < math.inf else 1.0


def _totals(tensors: Iterable[Tensor]) -> tuple[float, int, float]:
    """The sum, the number of entries and the largest entry of ``tensors`` (float64), over the
    whole tensors under FSDP (each rank's shard, reduced over the ranks)."""
    tensors = list(tensors)
    shards = [fsdp.local(t).detach().double() for t in tensors]
    total = sum(float(v.sum()) for v in shards)
    top = max((float(v.max()) for v in shards if v.numel()), default=-math.inf)
    (total,) = fsdp.summed([total], tensors)
    (top,) = fsdp.summed([top], tensors, op=dist.ReduceOp.MAX)
    return total, sum(t.numel() for t in tensors), top


@torch.no_grad()
def importance_scale(importance: Mapping[str, Tensor]) -> dict[str, Any]:
    """The scale of an importance dict, in its own units (1/θ² for a Fisher): ``mean`` and
    ``max`` over every entry, and per parameter (``layers``) its ``mean``, ``max`` and the
    :data:`QUANTILES` as ``q50``, ``q90``, ``q99`` (computed in float64; a parameter over
    2**24 entries is read with an even stride for its quantiles)."""
    layers: dict[str, dict[str, float]] = {}
    for name, value in importance.items():
        if value.numel() == 0:
            continue
        total, count, top = _totals([value])
        layer = {"mean": total / count, "max": top}
        if not fsdp.is_sharded(value):  # a shard's quantiles are not the parameter's
            v = value.detach().reshape(-1).double()
            stride = math.ceil(v.numel() / _MAX_QUANTILE_ENTRIES)
            levels = torch.tensor(QUANTILES, dtype=v.dtype, device=v.device)
            q = torch.quantile(v[::stride], levels)
            layer |= {f"q{round(100 * p)}": float(x) for p, x in zip(QUANTILES, q, strict=True)}
        layers[name] = layer
    total, count, top = _totals(importance.values())
    return {"mean": total / max(count, 1), "max": top if count else 0.0, "layers": layers}


class Probe:
    """Iterate over ``batches`` once, keeping their first ``n`` samples (``kept``: the first
    batches, the last one cut), so that the consolidation data can be read again after a
    one-pass iterable (a progress bar, a generator) is spent."""

    def __init__(self, batches: Iterable[Any], n: int = PROBE_SAMPLES) -> None:
        self._batches, self._n = batches, n
        self.kept: list[Any] = []

    def __iter__(self) -> Iterator[Any]:
        left = self._n
        for batch in self._batches:
            if left > 0:
                size = batch_size(batch)
                self.kept.append(batch if size <= left else take(batch, size, slice(0, left)))
                left -= min(size, left)
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
    names = list(importance)
    shards = [(fsdp.local(importance[n]).double(), fsdp.local(anchor[n]).double()) for n in names]
    costs = [0.5 * float((f * a.square()).sum()) for f, a in shards]
    return dict(zip(names, fsdp.summed(costs, importance.values()), strict=True))


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
    """The warning for one consolidation's ``stats`` (``lam_half``, ``unprotected``,
    ``fisher_mean``, ``normalize``, ``confidence``) when the model is near-certain (mean
    max-probability >= :data:`CERTAIN`) and λ is below ``lam_half`` / :data:`WEAK_MARGIN`; else
    ``None`` (also for λ = 0, no penalty on purpose)."""
    lam_half, conf = stats["lam_half"], stats.get("confidence")
    if lam == 0 or lam * WEAK_MARGIN >= lam_half or conf is None or conf["max_prob"] < CERTAIN:
        return None
    fix = f"a λ from {lam_half:.0e} to {10 * lam_half:.0e}"
    if stats["normalize"] != "rewrite":
        fix += " or normalize='rewrite' with λ from 1 to 10"
    return (
        f"{name}: the penalty cannot matter: the Fisher vanished because the model is "
        f"near-certain on the consolidation data (mean Fisher = {stats['fisher_mean']:.3g}, mean "
        f"max-probability = {conf['max_prob']:.6f}, mean entropy = {conf['entropy']:.3g} nats), "
        f"and λ = {lam:.3g} is {lam / lam_half:.1e} of λ½ = {lam_half:.3g}, the λ at which half "
        f"of the regularized weights cost 1 nat of penalty or more to move to zero (at this λ, "
        f"{100 * stats['unprotected']:.0f}% cost less). Use {fix} (choose on validation data); "
        "see ewc.regularizers.scale."
    )
