"""``fisher_diagonal``: the diagonal Fisher information of a model, four ways."""

from __future__ import annotations

import warnings
from collections.abc import Generator, Iterable, Iterator
from contextlib import closing, contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_leaves

from ewc import fsdp

from ._util import eval_mode
from .batching import Forward, batch_size, call_forward, default_forward, take, to_device
from .errors import FisherError
from .func import func_batch
from .hooks import HookEngine, HooksUnsupported
from .likelihoods import Likelihood, SeededGenerator, checked_log_prob, resolve_likelihood
from .loop import loop_batch
from .request import Request

KINDS = ("exact", "sampled", "predicted", "empirical", "batched")
METHODS = ("auto", "hooks", "func", "loop")


def fisher_diagonal(
    model: nn.Module,
    batches: Iterable[Any],
    kind: str = "exact",
    likelihood: str | Likelihood = "categorical",
    n_samples: int | None = None,
    forward: Forward | None = None,
    seed: int = 0,
    method: str = "auto",
    distributed: bool = True,
) -> dict[str, Tensor]:
    r"""The diagonal of the Fisher information, averaged over samples.

    For samples :math:`x_1..x_N` and per-sample gradients
    :math:`g_i(y) = \nabla_\theta \log p(y \mid x_i, \theta)`, returns per parameter

    - ``"exact"``: :math:`\frac1N \sum_i \mathbb{E}_{y \sim p(\cdot \mid x_i)}[g_i(y)^2]`, the
      true Fisher (for a categorical, :math:`\sum_c p_c\, g_i(c)^2`; Martens 2020);
    - ``"sampled"``: :math:`\frac1N \sum_i g_i(\tilde y_i)^2` with one
      :math:`\tilde y_i \sim p(\cdot \mid x_i)` per sample, an unbiased Monte-Carlo estimate of
      the exact one (the estimator of Kirkpatrick et al. 2017), reproducible from ``seed``;
    - ``"predicted"``: :math:`\frac1N \sum_i g_i(\hat y_i)^2` with the model's own most
      probable label :math:`\hat y_i` (argmax), as van de Ven & Tolias 2019's code estimates
      EWC's Fisher. Not the Fisher either: a sample predicted with confidence :math:`1-\epsilon`
      contributes :math:`O(\epsilon^2)` where the exact Fisher has :math:`O(\epsilon)`, so it is
      smaller and dominated by the uncertain samples (λ does not carry over between kinds);
    - ``"empirical"``: :math:`\frac1N \sum_i g_i(y_i)^2` with the true labels -- not the
      Fisher in general (Kunstner et al. 2019);
    - ``"batched"``: :math:`\frac1N \sum_b B_b\, \bar g_b^2` with :math:`\bar g_b` the gradient
      of the *mean* log-likelihood of mini-batch :math:`b` (size :math:`B_b`, true labels). A
      cheap, **biased** approximation (cross-sample products do not vanish) that several
      libraries use; it depends on the batching and equals ``"empirical"`` for batches of one.

    Entries have the units of :math:`(\partial \log p / \partial\theta)^2`, i.e. 1/θ².

    Each batch is moved to the device of the model's parameters (tensors anywhere in a tuple,
    list or dict; batches with no samples are skipped), and the sums over samples accumulate in
    float32 for float16/bfloat16 models (the result has the parameters' dtype). Under
    ``torch.distributed`` (a process group is initialised) the per-parameter sums and the sample
    count are all-reduced, as DDP does for gradients: every rank returns the Fisher of the union
    of all ranks' batches, equal to one process on all of them (shards may differ in size; a
    rank may have none). Every rank must call it. A ``DistributedDataParallel`` model is
    evaluated through its ``.module``, without DDP's gradient hooks.

    Computed in eval mode (dropout off, BatchNorm with its running statistics, which stay
    untouched); the ``training`` flag of every submodule is restored afterwards. Gradients come
    from ``torch.autograd.grad``: every ``param.grad`` stays as it was. The model's
    parameters are not changed and no graph outlives the call.

    Args:
        model: a batch-first model (samples along dim 0 of inputs and outputs).
        batches: an iterable of batches, e.g. a ``DataLoader`` or a list of
            ``(inputs, targets)`` tensor pairs. The hook method processes each batch at once, so
            the batch size sets the speed / memory trade-off: on a CPU about 128 for MNIST
            (larger activations are page-faulted in anew for every pass), on a GPU 1024.
        kind: ``"exact"``, ``"sampled"``, ``"predicted"``, ``"empirical"`` or ``"batched"``
            (see above).
        likelihood: ``"categorical"`` (softmax over logits ``[N, C]``, C >= 2; int64 targets;
            ``-inf`` logits mean probability 0), ``"bernoulli"`` (sigmoid of each logit: one
            output unit for binary, ``[N, K]`` for multi-label; 0/1 targets shaped like the
            output), ``"gaussian"`` (unit variance; float targets shaped like the output), a
            :class:`~ewc.fisher.GaussianLikelihood` or any object implementing
            :class:`~ewc.fisher.Likelihood`.
        n_samples: use only the first ``n_samples`` samples (the last batch is cut; iteration
            stops there). ``None``: all.
        forward: ``forward(model, batch) -> (output, target)``, how a batch is fed; default
            ``model(batch[0]), batch[1]``. Use it for dict batches, extra model arguments or
            output masks (``out.masked_fill(~active, -inf)``).
        seed: seeds the ``torch.Generator`` of ``"sampled"`` (the global RNG is not used).
        method: ``"auto"`` (default): forward/backward hooks and per-layer rules (Linear: one
            matmul :math:`(\delta^2)^\top a^2` over the batch, Goodfellow 2015; Conv1d/2d,
            BatchNorm, LayerNorm, GroupNorm, Embedding; any other module by a per-sample
            ``torch.func`` vjp), switching to ``"func"`` where the hooks cannot split the
            computation per module (a module called twice, shared or outside-used
            parameters), and to ``"loop"``, with a warning, where ``torch.func`` cannot
            transform the model (``nn.LSTM`` / ``GRU`` / ``RNN``, ``.item()`` in ``forward``).
            ``"hooks"``: the same, raising :class:`FisherError` instead of switching.
            ``"func"``: whole-model ``vmap`` of per-sample vjps. ``"loop"``: the plain
            per-sample reference. The first three give the same result up to rounding for
            ``"exact"``, ``"sampled"``, ``"predicted"`` and ``"empirical"``; ``"batched"``
            ignores ``method``.
        distributed: all-reduce over the default process group when one is initialised
            (default); ``False``: this process's batches only.

    Returns:
        ``{name: F}`` for every parameter with ``requires_grad`` (names from
        ``model.named_parameters()``), each with its parameter's shape, device and dtype.

    Raises:
        FisherError: (a ``ValueError``) for an unknown ``kind`` / ``likelihood`` / ``method``,
            no trainable parameters, ``batches`` without samples, targets outside the classes,
            zero-probability targets, NaN/+Inf model outputs, or a non-finite result; errors
            raised while a batch is processed name the batch's index.

    References:
        Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks", PNAS.
        Martens 2020, "New insights and perspectives on the natural gradient method", JMLR.
        Kunstner, Balles & Hennig 2019, "Limitations of the empirical Fisher approximation",
        NeurIPS. Goodfellow 2015, "Efficient per-example gradient computations", arXiv:1510.01799.
    """
    _check_choice("kind", kind, KINDS)
    _check_choice("method", method, METHODS)
    check_flag("distributed", distributed)
    if n_samples is not None and (
        isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1
    ):
        raise FisherError(
            f"n_samples must be a positive int or None; got n_samples={n_samples!r}. Pass e.g. "
            "n_samples=1000, or None to use every sample."
        )
    resolved = resolve_likelihood(likelihood, kind)
    inner = unwrap(model)
    params: dict[str, Tensor] = {name: p for name, p in inner.named_parameters() if p.requires_grad}
    if not params:
        raise FisherError(
            f"{type(model).__name__} has no parameters with requires_grad=True, so there is no "
            "Fisher to compute. Unfreeze the parameters to consolidate."
        )
    request = Request(
        inner, params, forward or default_forward, kind, resolved, SeededGenerator(seed)
    )
    mean = sample_mean(request, first_samples(batches, n_samples), method, distributed=distributed)
    prefix = "module." if inner is not model else ""  # the names model.named_parameters() gives
    return {prefix + name: f for name, f in mean.items()}


def _sharded_method(kind: str, method: str) -> str:
    """The method for an FSDP2 model: hooks only (they see each layer while FSDP has it
    unsharded), without the switch to ``"func"``; ``"batched"``, ``"func"`` and ``"loop"``
    differentiate the sharded parameters themselves, which FSDP does not expose to autograd."""
    if kind == "batched" or method in ("func", "loop"):
        bad = "kind='batched'" if kind == "batched" else f"method={method!r}"
        raise FisherError(
            f"{bad} is not supported on an FSDP (fully_shard) model: the Fisher of a sharded "
            "model is computed by the hooks. Use method='auto' with kind 'exact', 'sampled', "
            "'predicted' or 'empirical'."
        )
    return "hooks"


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper, else
    ``model`` (its parameters are the wrapper's, without the ``module.`` prefix)."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


def sample_mean(
    request: Request,
    batches: Iterable[Any],
    method: str = "auto",
    what: str = "Fisher",
    distributed: bool = True,
) -> dict[str, Tensor]:
    r"""Mean over samples of :math:`|g_i|^p` (``p = request.power``) for every parameter in
    ``request.params``, computed in eval mode by ``method`` (see :func:`fisher_diagonal`, also
    for batch placement, float32 sums and ``distributed``); parameters that got no gradient are
    zero. ``what`` names the result in errors."""
    sharded = fsdp.check_sharding(request.params.values(), what)
    if sharded:
        method = _sharded_method(request.kind, method)
    if request.kind != "batched" and method != "loop":
        _check_samples_independent(request.model)
    sums = {name: _accumulator(p) for name, p in request.params.items()}
    total = 0
    feed = Feed(batches, next(iter(request.params.values())))
    with eval_mode(request.model):
        parts = _per_batch(request, iter(feed), method)
        with torch.enable_grad(), closing(parts), feed.naming_errors():
            for part, n in parts:
                for name, value in part.items():
                    sums[name].add_(value)
                total += n
    if sharded:
        # Each rank summed full-shape squares of its samples: reduce-scatter them to the shards.
        for name, p in request.params.items():
            sums[name] = fsdp.shard_of(sums.pop(name), p, reduce=distributed)
        if distributed:  # over the ranks of the parameters' mesh
            total = int(fsdp.summed([total], request.params.values())[0])
    elif distributed:
        total = all_reduce(sums, total)
    if total == 0:
        raise FisherError(
            "batches yielded no samples; pass a non-empty DataLoader or list of "
            "(inputs, targets) batches."
        )
    mean = {name: (sums[name] / total).to(p.dtype) for name, p in request.params.items()}
    bad = fsdp.summed(
        [int((~torch.isfinite(fsdp.local(m))).sum()) for m in mean.values()], mean.values()
    )
    for name, count in zip(mean, bad, strict=True):
        if count:
            raise FisherError(
                f"the {what} of parameter {name!r} has {int(count)} NaN/Inf entries: the "
                "model's outputs or gradients overflow. Lower the learning rate, check the inputs "
                "for NaN/Inf, or compute in float64."
            )
    return mean


class Feed:
    """``batches`` moved to the device of ``param``, skipping empty ones and refusing NaN/+Inf
    in their float tensors (-Inf may be a mask); ``index``: the last one yielded."""

    def __init__(self, batches: Iterable[Any], param: Tensor) -> None:
        self.batches, self.device, self.dtype = batches, param.device, param.dtype
        self.index, self.batch = -1, None

    @contextmanager
    def naming_errors(self) -> Iterator[None]:
        """Prefix a :class:`FisherError` raised inside with the index of the current batch; any
        other error of the model on a batch (a RuntimeError, TypeError, IndexError: wrong
        width, wrong dtype, wrong structure) becomes a :class:`FisherError` naming the batch,
        its tensors' shapes and torch's message, with the fix for a dtype other than the
        parameters'. Out-of-memory errors pass as they are."""
        try:
            yield
        except FisherError as e:
            raise type(e)(f"batch {self.index}: {e}") from e
        except (RuntimeError, TypeError, IndexError) as e:
            if isinstance(e, torch.OutOfMemoryError):
                raise
            leaves = [leaf for leaf in tree_leaves(self.batch) if isinstance(leaf, Tensor)]
            shapes = ", ".join(str(list(leaf.shape)) for leaf in leaves) or "no tensors"
            others = {leaf.dtype for leaf in leaves if leaf.is_floating_point()} - {self.dtype}
            fix = "Check that the batches are what the model takes (width, dtype, structure)."
            if others:
                floats = ", ".join(sorted(str(d).removeprefix("torch.") for d in others))
                fix = (
                    f"The batch holds {floats} tensors and the model's parameters are "
                    f"{str(self.dtype).removeprefix('torch.')}. Cast the batches "
                    f"(x.to({self.dtype})) or compute under torch.autocast."
                )
            message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FisherError(
                f"batch {self.index}: the model failed on a batch of shape(s) {shapes}: "
                f"{message}. {fix}"
            ) from e

    def __iter__(self) -> Iterator[Any]:
        for index, batch in enumerate(self.batches):
            self.index, self.batch = index, batch
            if batch_size(batch) == 0:
                continue
            for leaf in tree_leaves(batch):
                if isinstance(leaf, Tensor) and leaf.is_floating_point():
                    bad = int(leaf.isnan().sum() + leaf.isposinf().sum())
                    if bad:
                        raise FisherError(
                            f"{bad} NaN/+Inf values in a batch tensor of shape "
                            f"{list(leaf.shape)}. Clean the data (torch.isfinite(x).all()) or "
                            "drop those samples."
                        )
            yield to_device(batch, self.device)


def _accumulator(p: Tensor) -> Tensor:
    """Zeros for the sum over samples: the parameter's shape in :func:`sum_dtype`; full-shape
    (not sharded) for an FSDP parameter, whose layers the hooks see unsharded."""
    if fsdp.is_sharded(p):
        return torch.zeros(p.shape, dtype=sum_dtype(p), device=p.device)
    return torch.zeros_like(p, dtype=sum_dtype(p))


def sum_dtype(p: Tensor) -> torch.dtype:
    """float32 sums for half-precision parameters, the parameter's dtype otherwise."""
    return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype


def all_reduce(sums: dict[str, Tensor], total: int) -> int:
    """Sum ``sums`` (in place) and ``total`` over the default process group; without one,
    return ``total`` and leave ``sums`` as they are."""
    if not (dist.is_available() and dist.is_initialized()):
        return total
    for value in sums.values():
        dist.all_reduce(value)
    device = next(iter(sums.values())).device
    count = torch.tensor([total], dtype=torch.float64, device=device)
    dist.all_reduce(count)
    return int(count.item())


def _check_choice(what: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise FisherError(f"{what}={value!r} is not one of {list(choices)}; pass one of those.")


def check_flag(name: str, value: object) -> bool:
    """``value`` if it is a bool, else a :class:`FisherError` (a ``ValueError``) naming it: a
    flag such as ``distributed="no"`` would otherwise read as true."""
    if not isinstance(value, bool):
        raise FisherError(f"{name} must be True or False; got {name}={value!r}.")
    return value


def _check_samples_independent(model: nn.Module) -> None:
    """Refuse layers that mix samples in eval mode (the batched forward would not be per-sample)."""
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and module.running_mean is None:
            raise FisherError(
                f"BatchNorm {name!r} has no running statistics, so even in eval mode it normalises "
                "with batch statistics and mixes the samples: a per-sample Fisher from a batched "
                "forward is undefined. Use track_running_stats=True, or method='loop' (which "
                "normalises each sample alone)."
            )


def first_samples(batches: Iterable[Any], limit: int | None) -> Iterator[Any]:
    """``batches``, cut after ``limit`` samples (without pulling the next batch)."""
    if limit is None:
        yield from batches
        return
    remaining = limit
    for batch in batches:
        n = batch_size(batch)
        if n >= remaining:
            yield take(batch, n, slice(0, remaining))
            return
        remaining -= n
        yield batch


def _per_batch(
    request: Request, batches: Iterator[Any], method: str
) -> Generator[tuple[dict[str, Tensor], int], None, None]:
    """Per batch: sums of per-sample gradient powers (by parameter name) and the sample count.

    ``"auto"`` goes hooks → ``func`` → loop, each step down for the rest of the call: to
    ``func`` where the hooks cannot split the computation, to the loop where ``torch.func``
    cannot transform the model (e.g. ``nn.LSTM``, ``.item()`` in ``forward``), with a warning.
    Out-of-memory errors are raised, not switched."""
    hooks = method in ("auto", "hooks") and request.kind != "batched"
    engine = HookEngine(request) if hooks else None
    use_loop = method == "loop"
    try:
        for batch in batches:
            result = None
            if request.kind == "batched":
                result = _batched(request, batch)
            elif engine is not None:
                try:
                    result = engine.batch(batch)
                except (HooksUnsupported, RuntimeError) as e:
                    if method == "hooks" or isinstance(e, torch.OutOfMemoryError):
                        raise
                    engine.close()
                    engine = None
            if result is None and not use_loop:
                try:
                    result = func_batch(request, batch)
                except RuntimeError as e:
                    if method == "func" or isinstance(e, torch.OutOfMemoryError):
                        raise
                    result = loop_batch(request, batch)  # raises the model's own errors
                    _warn_loop(request.model, e)
                    use_loop = True
            if result is None:
                result = loop_batch(request, batch)
            yield result
    finally:
        if engine is not None:
            engine.close()


def _warn_loop(model: nn.Module, e: RuntimeError) -> None:
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    reason = reason if len(reason) <= 160 else reason[:157] + "..."
    warnings.warn(
        f"torch.func could not compute per-sample gradients of {type(model).__name__} "
        f"({reason}), so they are computed one sample at a time: the same values, one backward "
        "pass per sample. method='loop' skips the attempt; method='func' raises instead.",
        stacklevel=4,
    )


def _batched(request: Request, batch: Any) -> tuple[dict[str, Tensor], int]:
    """:math:`B \\bar g^2` with :math:`\\bar g` the gradient of the batch-mean log-likelihood."""
    output, target, n = call_forward(request.forward, request.model, batch)
    mean = checked_log_prob(request.likelihood, output, target).mean()
    params = request.params
    grads = torch.autograd.grad(mean, list(params.values()), allow_unused=True)
    squares = {name: n * g.square() for name, g in zip(params, grads, strict=True) if g is not None}
    return squares, n
