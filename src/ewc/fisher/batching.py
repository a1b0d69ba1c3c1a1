"""Batches as pytrees: counting, slicing and splitting samples.

A batch is whatever ``batches`` yields (a tuple, a dict, ...). Every tensor in it whose first
dimension equals the batch size is taken to hold one row per sample; other leaves (non-tensors,
shared tensors of another size) are passed unchanged to every sample.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .errors import FisherError


def batch_size(batch: Any) -> int:
    """Samples in ``batch``: the first dimension of its first tensor."""
    for leaf in tree_flatten(batch)[0]:
        if isinstance(leaf, Tensor) and leaf.ndim >= 1:
            return int(leaf.shape[0])
    raise FisherError(
        f"a batch of type {type(batch).__name__} holds no tensor with a sample dimension; "
        "batches must be (inputs, targets) tensor pairs or pytrees of batch-first tensors."
    )


def is_per_sample(leaf: Any, n: int) -> bool:
    """Whether ``leaf`` is a tensor with one row per sample of an ``n``-sample batch."""
    return isinstance(leaf, Tensor) and leaf.ndim >= 1 and leaf.shape[0] == n


def to_device(tree: Any, device: torch.device) -> Any:
    """``tree`` with every tensor on ``device`` (asynchronous from pinned memory)."""
    return tree_map(
        lambda leaf: leaf.to(device, non_blocking=True) if isinstance(leaf, Tensor) else leaf,
        tree,
    )


def take(tree: Any, n: int, rows: slice) -> Any:
    """``tree`` with every per-sample tensor of an ``n``-sample batch cut to ``rows``."""
    return tree_map(lambda leaf: leaf[rows] if is_per_sample(leaf, n) else leaf, tree)


class SampleSplit:
    """A pytree split into its per-sample tensors and the rest, for ``torch.func.vmap``.

    ``per_sample`` lists the per-sample tensors (vmap them over dim 0); :meth:`rebuild` puts a
    list of such tensors back into the tree, each given a leading batch dimension of 1.
    """

    def __init__(self, tree: Any, n: int) -> None:
        self._leaves, self._spec = tree_flatten(tree)
        self._mask = [is_per_sample(leaf, n) for leaf in self._leaves]
        self.per_sample: list[Tensor] = [
            leaf for leaf, m in zip(self._leaves, self._mask, strict=True) if m
        ]

    def rebuild(self, rows: list[Tensor]) -> Any:
        """The tree with its per-sample tensors replaced by ``rows[k].unsqueeze(0)``."""
        it = iter(rows)
        leaves = [
            next(it).unsqueeze(0) if m else leaf
            for leaf, m in zip(self._leaves, self._mask, strict=True)
        ]
        return tree_unflatten(leaves, self._spec)


Forward = Callable[[nn.Module, Any], tuple[Tensor, Any]]
"""``forward(model, batch) -> (output, target)``: how one batch is fed to the model."""


def default_forward(model: nn.Module, batch: Any) -> tuple[Tensor, Any]:
    """``model(inputs), targets`` for an ``(inputs, targets)`` pair."""
    if isinstance(batch, Tensor):
        raise FisherError(
            f"a batch is one tensor of shape {list(batch.shape)}, not an (inputs, targets) "
            "pair: batches must yield pairs. To pass a single pair (x, y), wrap it in a list: "
            "[(x, y)]; a tensor dataset goes in DataLoader(TensorDataset(x, y), batch_size=...)."
        )
    if isinstance(batch, (tuple, list)) and len(batch) != 2:
        raise FisherError(
            f"a batch of {len(batch)} items is not an (inputs, targets) pair; pass "
            "forward=lambda model, batch: (model(batch[0]), batch[1]) (or similar) to say "
            "which items are the inputs and which the targets."
        )
    if not isinstance(batch, (tuple, list)):
        raise FisherError(
            f"a batch of type {type(batch).__name__} is not an (inputs, targets) pair; pass "
            "forward=lambda model, batch: (model(batch['x']), batch['y']) (or similar) to say "
            "how to feed it."
        )
    inputs, targets = batch
    return model(inputs), targets


class ForwardModule(nn.Module):
    """``model`` fed through ``forward``: a module of the whole batch returning the output.

    For ``torch.func.functional_call``: its parameters are ``model.<name>``.
    """

    def __init__(self, model: nn.Module, forward: Forward) -> None:
        super().__init__()
        self.model = model
        self.feed = forward

    def forward(self, batch: Any) -> Tensor:
        return self.feed(self.model, batch)[0]


def call_forward(forward: Forward, model: nn.Module, batch: Any) -> tuple[Tensor, Any, int]:
    """``forward(model, batch)`` checked: returns ``(output, target, n_samples)``."""
    result = forward(model, batch)
    if not (isinstance(result, tuple) and len(result) == 2):
        raise FisherError(
            f"forward(model, batch) must return an (output, target) pair; got "
            f"{type(result).__name__}. Return e.g. (model(x), y)."
        )
    output, target = result
    if not isinstance(output, Tensor):
        raise FisherError(
            f"the model's output is a {type(output).__name__}, not a tensor of logits; pass "
            "forward=lambda model, batch: (model(x).logits, y) (or out['logits'], out[0]: "
            "whatever holds the logits) to pick it."
        )
    if bool(output.isnan().any()) or bool(output.isposinf().any()):
        raise FisherError(
            f"the model's output holds {int(output.isnan().sum())} NaN and "
            f"{int(output.isposinf().sum())} +Inf entries: the inputs hold NaN/Inf or the model "
            "has diverged. Check the data (torch.isfinite(x).all()) and the weights."
        )
    if output.ndim == 0 or (isinstance(target, Tensor) and target.shape[:1] != output.shape[:1]):
        raise FisherError(
            f"the output (shape {list(output.shape)}) and the target "
            f"(shape {list(getattr(target, 'shape', []))}) must hold the same number of samples "
            "along dim 0. Return batch-first tensors from forward; a Dataset yields single "
            "samples, so wrap it in DataLoader(dataset, batch_size=...)."
        )
    return output, target, int(output.shape[0])
