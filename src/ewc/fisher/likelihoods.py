r"""Likelihoods: how a model output defines :math:`p(y \mid x)`.

A likelihood is any object with these methods (see :class:`Likelihood`); ``output`` is the model
output for a batch (samples along dim 0), ``target`` the batch's targets:

``log_prob(output, target) -> Tensor[N]``
    :math:`\log p(y_i \mid x_i)` per sample, differentiable in ``output``. Row ``i`` may depend
    on ``output[i]`` and ``target[i]`` only. Used by the ``"empirical"``, ``"sampled"`` and
    ``"batched"`` kinds.
``sample(output, generator) -> target``
    One draw :math:`y_i \sim p(\cdot \mid x_i)` per sample, using only ``generator`` for
    randomness. Used by ``"sampled"``.
``predict(output) -> target`` (optional)
    The model's own most probable target per sample (a categorical's argmax). Used by
    ``"predicted"`` only.
``ignored(target) -> Tensor | None`` (optional)
    Where the target carries no label (a bool mask shaped like ``target``, e.g. padding
    tokens marked ``-100``): the output-gradients are zeroed there for every kind, and a model
    target (sampled, predicted) keeps the true target's entries there.
``exact_output_grads(output) -> Iterator[Tensor]``
    Tensors :math:`v_1, \dots, v_K` shaped like ``output`` with
    :math:`\sum_k v_{k,i} v_{k,i}^\top = \mathbb{E}_{y \sim p(\cdot \mid x_i)}
    [\nabla_{f} \log p(y \mid f_i) \nabla_{f} \log p(y \mid f_i)^\top]`, the Fisher of the
    likelihood in output space. Backpropagating each :math:`v_k` and summing the squared
    parameter gradients gives the exact diagonal Fisher. Used by ``"exact"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import FisherError


@runtime_checkable
class Likelihood(Protocol):
    """The protocol :func:`ewc.fisher.fisher_diagonal` needs; see the module docstring."""

    def log_prob(self, output: Tensor, target: Tensor) -> Tensor:
        """Per-sample log-likelihood, shape ``[N]``."""
        ...

    def sample(self, output: Tensor, generator: torch.Generator) -> Tensor:
        """One target per sample drawn from the model's predictive distribution."""
        ...

    def exact_output_grads(self, output: Tensor) -> Iterator[Tensor]:
        """Output-space square-root factors of the likelihood's Fisher (see module docstring)."""
        ...


class CategoricalLikelihood:
    r"""Softmax over the last dimension of ``output[N, ..., C]``; targets are int64 class ids
    shaped ``output[..., 0]`` (``[N]`` for a classifier, ``[N, T]`` for token classification or
    a language model's next tokens).

    :math:`\log p(y \mid x) = \sum_t (z_{t,y_t} - \operatorname{logsumexp}(z_t))` over the
    positions :math:`t` of a sample (one for a classifier): the positions are independent given
    the input, as in a token classifier or a teacher-forced language model. Targets equal to
    ``ignore_index`` (``-100``, as in ``F.cross_entropy`` and Hugging Face labels) add
    nothing. Logits of ``-inf`` (masked classes) have probability 0: they are never sampled and
    add nothing to the exact Fisher. The output-space Fisher of a position,
    :math:`\operatorname{diag}(p) - pp^\top`, has rank :math:`C - 1` (the rows sum to 0), and
    :meth:`exact_output_grads` yields a square root with one vector per class but one that has
    nonzero probability for some sample in the batch, so ``"exact"`` costs positions ×
    (classes − 1) backward passes (refused above :data:`MAX_EXACT_PASSES` with extra
    positions: use ``"sampled"``, one pass, unbiased).

    Args:
        ignore_index: the target value that marks a position without a label.
    """

    def __init__(self, ignore_index: int = -100) -> None:
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise FisherError(
                f"ignore_index must be an int (the label that marks 'no label'); got "
                f"ignore_index={ignore_index!r}. Pass e.g. -100, as in F.cross_entropy."
            )
        self.ignore_index = ignore_index

    def __repr__(self) -> str:
        return f"CategoricalLikelihood(ignore_index={self.ignore_index})"

    def log_prob(self, output: Tensor, target: Tensor) -> Tensor:
        r"""Per-sample :math:`\log p(y_i \mid x_i)` summed over positions, shape ``[N]``."""
        _check_logits(output)
        n_classes = output.shape[-1]
        if (
            target.dtype.is_floating_point
            or target.dtype == torch.bool
            or tuple(target.shape) != tuple(output.shape[:-1])
        ):
            raise FisherError(
                f"categorical targets must be int64 class ids of shape "
                f"{list(output.shape[:-1])} (the logits' shape without the class dimension); "
                f"got dtype {target.dtype} and shape {list(target.shape)}. Pass labels, not "
                "one-hot or float targets (or use likelihood='gaussian' for regression)."
            )
        keep = target != self.ignore_index
        labels = target[keep]
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
            raise FisherError(
                f"categorical targets must lie in [0, {n_classes}) for n_classes={n_classes} "
                f"(or be ignore_index={self.ignore_index}); got min={int(labels.min())}, "
                f"max={int(labels.max())}. Remap the labels to the model's output units or "
                "widen the output layer."
            )
        log_p = torch.log_softmax(output, dim=-1)
        picked = log_p.gather(-1, target.masked_fill(~keep, 0).long().unsqueeze(-1)).squeeze(-1)
        return torch.where(keep, picked, 0.0).reshape(len(output), -1).sum(1)

    def sample(self, output: Tensor, generator: torch.Generator) -> Tensor:
        """One class id per position, drawn from ``softmax(output)`` with ``generator``."""
        _check_logits(output)
        probs = torch.softmax(output.detach(), dim=-1).reshape(-1, output.shape[-1])
        drawn = torch.multinomial(probs, 1, generator=generator)
        return drawn.reshape(output.shape[:-1])

    def predict(self, output: Tensor) -> Tensor:
        """The most probable class per position (``argmax``; masked classes never)."""
        _check_logits(output)
        return output.detach().argmax(dim=-1)

    def ignored(self, target: Tensor) -> Tensor:
        """``target == ignore_index``: the positions without a label."""
        return target == self.ignore_index

    def exact_output_grads(self, output: Tensor) -> Iterator[Tensor]:
        r"""Yield, at one position at a time, the columns :math:`v_j` of a rank-:math:`(C-1)`
        square root of :math:`\operatorname{diag}(p) - pp^\top`, one per class :math:`j \ne k`
        with some nonzero probability there (:math:`k`: the class most probable for some
        sample).

        With :math:`q = \sqrt{p}`, :math:`\operatorname{diag}(p) - pp^\top = D P D` for
        :math:`D = \operatorname{diag}(q)` and the projection :math:`P = I - qq^\top`. The
        Householder reflection that maps :math:`q` to :math:`-e_k` has its other columns
        :math:`u_j = e_j - w\,q_j / (1 + q_k)`, :math:`w = q + e_k`, an orthonormal basis of
        :math:`q^\perp`, so :math:`P = \sum_{j \ne k} u_j u_j^\top` and
        :math:`v_j = D u_j = q_j \left(e_j - \frac{p + q_k e_k}{1 + q_k}\right)`. The
        denominator is at least 1: stable in float32 for any :math:`p`. One backward pass
        fewer than the :math:`C` vectors :math:`q_c(e_c - p)`, which span the same space."""
        _check_logits(output)
        probs = torch.softmax(output.detach(), dim=-1)
        flat = probs.reshape(len(output), -1, output.shape[-1])  # [N, positions, C]
        passes = flat.shape[1] * (flat.shape[2] - 1)
        if flat.shape[1] > 1 and passes > MAX_EXACT_PASSES:
            raise FisherError(
                f"kind='exact' on logits of shape {list(output.shape)} costs one backward pass "
                f"per position and class but one, {passes} a batch (more than "
                f"{MAX_EXACT_PASSES}); use kind='sampled' (one pass a batch, an unbiased "
                "estimate of the same Fisher) or 'empirical'."
            )
        for t in range(flat.shape[1]):
            p = flat[:, t]  # [N, C]
            most = p.amax(dim=0)
            k = int(most.argmax())
            keep = (most > 0).index_fill_(0, torch.tensor(k, device=p.device), False)
            q = p.sqrt()
            shift = p.clone()
            shift[:, k] += q[:, k]
            shift /= 1 + q[:, k : k + 1]  # (p + q_k e_k) / (1 + q_k), [N, C]
            eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)[keep]  # e_j, [J, C]
            columns = q[:, keep, None] * (eye - shift[:, None, :])  # v_j, [N, J, C]
            for j in range(columns.shape[1]):
                v = torch.zeros_like(flat)
                v[:, t] = columns[:, j]
                yield v.view_as(output)


class GaussianLikelihood:
    r"""Gaussian :math:`y \sim \mathcal{N}(f(x), \sigma^2 I)`; targets are floats shaped like
    the output.

    :math:`\log p(y \mid x) = -\sum_k \left[\tfrac{(y_k - f_k)^2}{2\sigma^2} + \log\sigma
    + \tfrac12\log 2\pi\right]`, summed over all non-batch output entries. The Fisher is
    :math:`J^\top J / \sigma^2`; its output-space factors are :math:`e_k / \sigma`, one per output
    entry (so the exact kind costs one backward pass per output dimension).

    Args:
        sigma: the noise standard deviation, in the units of the targets (default 1).
    """

    def __init__(self, sigma: float = 1.0) -> None:
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise FisherError(
                f"GaussianLikelihood needs a finite sigma > 0; got sigma={sigma!r}. Pass the "
                "noise standard deviation of the targets, e.g. GaussianLikelihood(1.0)."
            )
        self.sigma = float(sigma)

    def __repr__(self) -> str:
        return f"GaussianLikelihood(sigma={self.sigma})"

    def log_prob(self, output: Tensor, target: Tensor) -> Tensor:
        """Per-sample Gaussian log density, shape ``[N]``."""
        if target.shape != output.shape:
            raise FisherError(
                f"gaussian targets must have the output's shape {list(output.shape)}; got "
                f"{list(target.shape)}. Reshape the targets (e.g. y.unsqueeze(1) for one output)."
            )
        z = (target.to(output.dtype) - output) / self.sigma
        const = math.log(self.sigma) + 0.5 * math.log(2 * math.pi)
        return -(0.5 * z.square() + const).reshape(len(output), -1).sum(1)

    def sample(self, output: Tensor, generator: torch.Generator) -> Tensor:
        """``output + sigma * eps`` with standard normal ``eps`` drawn from ``generator``."""
        eps = torch.randn(
            output.shape, generator=generator, dtype=output.dtype, device=output.device
        )
        return output.detach() + self.sigma * eps

    def exact_output_grads(self, output: Tensor) -> Iterator[Tensor]:
        """Yield :math:`e_k / \\sigma` for every output entry ``k``."""
        flat = output.detach().reshape(len(output), -1)
        return _entry_by_entry(torch.full_like(flat, 1.0 / self.sigma), output)


class BernoulliLikelihood:
    r"""Independent Bernoulli labels on logits: a binary classifier with one output unit
    (``[N]`` or ``[N, 1]``, trained with ``BCEWithLogitsLoss``) or a multi-label one
    (``[N, K]``, any shape ``[N, ...]``); targets are 0/1 (float, int or bool) shaped like the
    output.

    :math:`\log p(y \mid x) = \sum_k \left[y_k z_k - \operatorname{softplus}(z_k)\right]`
    over the output entries of a sample, with :math:`p_k = \sigma(z_k)`. The output-space
    Fisher is :math:`\operatorname{diag}(p_k(1 - p_k))`, so the exact kind yields
    :math:`\sqrt{p_k(1-p_k)}\,e_k`: one backward pass per output entry.
    """

    def __repr__(self) -> str:
        return "BernoulliLikelihood()"

    def log_prob(self, output: Tensor, target: Tensor) -> Tensor:
        """Per-sample Bernoulli log-likelihood summed over the output entries, shape ``[N]``."""
        if tuple(target.shape) != tuple(output.shape):
            raise FisherError(
                f"bernoulli targets must be 0/1 labels shaped like the logits "
                f"{list(output.shape)}; got shape {list(target.shape)}. Reshape them (e.g. "
                "y.float().unsqueeze(1) for one output unit); for class ids over several "
                "output units use likelihood='categorical'."
            )
        if not bool(((target == 0) | (target == 1)).all()):
            raise FisherError(
                f"bernoulli targets must be 0 or 1; got values from {target.min().item():g} to "
                f"{target.max().item():g}. Map them to 0/1; for class ids use "
                "likelihood='categorical'."
            )
        y = target.to(output.dtype)
        return (y * output - F.softplus(output)).reshape(len(output), -1).sum(1)

    def sample(self, output: Tensor, generator: torch.Generator) -> Tensor:
        """0/1 labels drawn from ``sigmoid(output)`` with ``generator`` (float32 uniforms, so a
        seed draws the same labels for a float32 and a float64 model)."""
        p = torch.sigmoid(output.detach().float())
        u = torch.rand(p.shape, generator=generator, device=p.device)
        return (u < p).to(output.dtype)

    def predict(self, output: Tensor) -> Tensor:
        """The more probable label of each entry: 1 where the logit is positive."""
        return (output.detach() > 0).to(output.dtype)

    def exact_output_grads(self, output: Tensor) -> Iterator[Tensor]:
        r"""Yield :math:`\sqrt{p_k(1-p_k)}\,e_k` for every output entry ``k``."""
        p = torch.sigmoid(output.detach()).reshape(len(output), -1)
        return _entry_by_entry((p * (1 - p)).sqrt(), output)


def _entry_by_entry(scale: Tensor, output: Tensor) -> Iterator[Tensor]:
    """For a diagonal output-space Fisher: per output entry ``k``, ``scale[:, k]`` at ``k`` and
    0 elsewhere, shaped like ``output``; ``scale`` is ``[N, entries]``."""
    for k in range(scale.shape[1]):
        v = torch.zeros_like(scale)
        v[:, k] = scale[:, k]
        yield v.view_as(output)


#: The most backward passes ``kind="exact"`` may take per batch on logits with extra positions.
MAX_EXACT_PASSES = 10_000

LIKELIHOODS: dict[str, Callable[[], Likelihood]] = {
    "categorical": CategoricalLikelihood,
    "bernoulli": BernoulliLikelihood,
    "gaussian": GaussianLikelihood,
}

_NEEDS = {
    "exact": "exact_output_grads",
    "sampled": "sample",
    "predicted": "predict",
    "empirical": "log_prob",
    "batched": "log_prob",
}


def resolve_likelihood(likelihood: str | Likelihood, kind: str) -> Likelihood:
    """Turn ``"categorical"`` / ``"bernoulli"`` / ``"gaussian"`` / a user object into a
    :class:`Likelihood`.

    Raises :class:`FisherError` for an unknown name or a likelihood without the method ``kind``
    needs (a Gaussian has no ``predict``: its predicted target, the mean, has zero gradient).
    """
    if isinstance(likelihood, str):
        if likelihood not in LIKELIHOODS:
            raise FisherError(
                f"likelihood={likelihood!r} is not one of {sorted(LIKELIHOODS)}; pass one of "
                "those names or an object with log_prob / sample / exact_output_grads."
            )
        return _check_has(LIKELIHOODS[likelihood](), kind)
    return _check_has(likelihood, kind)


def _check_has(likelihood: Likelihood, kind: str) -> Likelihood:
    method = _NEEDS[kind]
    if not callable(getattr(likelihood, method, None)):
        raise FisherError(
            f"likelihood={likelihood!r} has no method {method}(), which kind={kind!r} needs; "
            "implement it (see ewc.fisher.Likelihood), pass another kind or 'categorical'."
        )
    return likelihood


class SeededGenerator:
    """A ``torch.Generator`` seeded with ``seed``, created on the device of its first use."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._generator: torch.Generator | None = None

    def on(self, device: torch.device) -> torch.Generator:
        """The generator (created and seeded on ``device`` at the first call)."""
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator


def checked_log_prob(likelihood: Likelihood, output: Tensor, target: Any) -> Tensor:
    """``likelihood.log_prob(output, target)``, checked to be finite and of shape ``[N]``."""
    log_p = likelihood.log_prob(output, target)
    n = output.shape[0]
    if tuple(log_p.shape) != (n,):
        raise FisherError(
            f"{likelihood!r}.log_prob returned shape {list(log_p.shape)}; it must return one "
            f"log-likelihood per sample, shape [{n}]. Sum over the non-batch dimensions."
        )
    finite = torch.isfinite(log_p)
    if not bool(finite.all()):
        raise FisherError(
            f"log p(y|x) is -inf or NaN for {int((~finite).sum())} of {n} samples: a target "
            "has zero probability (e.g. its logit is masked to -inf) or the outputs are "
            "NaN/Inf. Check the targets against the output mask and the inputs for NaN/Inf."
        )
    return log_p


def output_grads(
    likelihood: Likelihood, kind: str, output: Tensor, target: Any, rng: SeededGenerator
) -> Iterator[Tensor]:
    r"""The output-gradients to backpropagate for ``kind`` (one per backward pass).

    ``"empirical"`` / ``"sampled"`` / ``"predicted"``: :math:`\nabla_f \sum_i \log p(y_i \mid
    f_i)` with the true / a sampled / the predicted target (one pass); ``"exact"``:
    :func:`exact_output_grads`.
    """
    out = output.detach()
    if kind == "exact":
        return exact_output_grads(likelihood, out, target)
    y = (
        model_target(likelihood, kind, out, rng, target)
        if kind in ("sampled", "predicted")
        else target
    )
    with torch.enable_grad():
        out.requires_grad_(True)
        (grad,) = torch.autograd.grad(checked_log_prob(likelihood, out, y).sum(), out)
    return iter([grad])


def exact_output_grads(likelihood: Likelihood, output: Tensor, target: Any) -> Iterator[Tensor]:
    """``likelihood.exact_output_grads(output)``, zeroed where the likelihood says ``target``
    is ignored (directions left all zero are skipped)."""
    ignored = _ignored(likelihood, target)
    for v in likelihood.exact_output_grads(output):
        if ignored is not None:
            v = v.masked_fill(ignored.reshape(*ignored.shape, *[1] * (v.ndim - ignored.ndim)), 0)
            if not bool(v.any()):
                continue
        yield v


def model_target(
    likelihood: Any, kind: str, output: Tensor, rng: SeededGenerator, target: Any = None
) -> Tensor:
    """The targets the model supplies for ``kind``: drawn from it (``"sampled"``) or its own
    prediction (``"predicted"``), keeping ``target``'s entries where the likelihood ignores
    them."""
    if kind == "sampled":
        y = likelihood.sample(output, rng.on(output.device))
    else:
        y = likelihood.predict(output)
    ignored = _ignored(likelihood, target)
    return y if ignored is None else torch.where(ignored, target, y)


def _ignored(likelihood: Any, target: Any) -> Tensor | None:
    """The likelihood's mask of unlabelled target entries, or ``None`` where there are none."""
    method = getattr(likelihood, "ignored", None)
    if method is None or not isinstance(target, Tensor):
        return None
    mask = method(target)
    return mask if bool(mask.any()) else None


def _check_logits(output: Tensor) -> None:
    if output.ndim < 2 or not output.dtype.is_floating_point:
        raise FisherError(
            f"the categorical likelihood needs float logits of shape [N, C] (or [N, ..., C] "
            f"with one class distribution per position); got dtype {output.dtype} and shape "
            f"{list(output.shape)}. Return logits from forward=, or pass a likelihood object "
            "for other outputs."
        )
    if output.shape[-1] == 1:
        raise FisherError(
            f"the categorical likelihood got logits of shape {list(output.shape)}: one class, "
            "whose softmax is 1 whatever the weights, so its Fisher would be 0 and EWC would "
            "hold nothing. For a binary classifier with one logit (BCEWithLogitsLoss) pass "
            "likelihood='bernoulli'; for regression likelihood='gaussian'."
        )
