"""What the report draws of a regularizer's importance: per-layer histograms and, for images
through a first Linear layer, a per-pixel map. Computed once per consolidation and stored in the
results (``importance``), so that views read results and never a regularizer."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn


def parameter_labels(model: nn.Module) -> dict[str, str]:
    """Each parameter's name mapped to its module path, module type, name and shape:
    ``"7.bias"`` -> ``"7: Linear.bias (768)"``."""
    labels = {}
    for path, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            shape = "×".join(map(str, p.shape))
            key = f"{path}.{name}" if path else name
            labels[key] = f"{path or '(model)'}: {type(module).__name__}.{name} ({shape})"
    return labels


def importance_summary(
    importance: dict[str, Tensor], model: nn.Module, input_shape: Sequence[int], task: int
) -> dict[str, Any]:
    """Per-layer log10 histograms of an importance dict (each with a ``label`` a reader
    understands, see :func:`parameter_labels`), and per-pixel importance of a first Linear layer
    on images (summed over its output units)."""
    positive = torch.cat([v.flatten() for v in importance.values()])
    positive = positive[positive > 0]
    lo, hi = (
        (positive.min().log10().item(), positive.max().log10().item())
        if len(positive)
        else (-12.0, 0.0)
    )
    edges = torch.linspace(math.floor(lo), math.ceil(hi) + 1e-9, 41, dtype=torch.float64)
    layers = {}
    labels = parameter_labels(model)
    for name, value in importance.items():
        v = value.detach().double().flatten().cpu()
        logv = v[v > 0].log10()
        counts = torch.histogram(logv, bins=edges).hist if len(logv) else torch.zeros(40)
        layers[name] = {
            "label": labels.get(name, name),
            "log10_edges": edges.tolist(),
            "counts": [int(c) for c in counts],
            "zeros": int((v <= 0).sum()),
            "mean": float(v.mean()),
            "max": float(v.max()),
        }
    summary: dict[str, Any] = {"task": task, "layers": layers}
    pixel_weight = _pixel_weight(model, input_shape)
    if pixel_weight in importance:
        pixels = importance[pixel_weight].detach().sum(0).reshape(tuple(input_shape)).sum(0)
        summary["input_importance"] = {
            "shape": list(pixels.shape),
            "values": [float(v) for v in pixels.flatten()],
        }
    return summary


def _pixel_weight(model: nn.Module, input_shape: Sequence[int]) -> str | None:
    """The name of the weight of a first Linear layer on images (a per-pixel map), else None."""
    first = next((m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)), None)
    if not isinstance(first, nn.Linear) or len(input_shape) != 3:
        return None
    return next(n for n, p in model.named_parameters() if p is first.weight)


#: The keys of a layer of :func:`importance_summary`; its histograms have this many bins.
_LAYER_KEYS = {"label", "log10_edges", "counts", "zeros", "mean", "max"}
_BINS = 40


def summary_problem(
    summary: Any, names: Sequence[str], model: nn.Module, input_shape: Sequence[int], task: int
) -> str | None:
    """How ``summary`` departs from what :func:`importance_summary` gives for task ``task``
    and the regularized parameters ``names`` of ``model`` (keys, labels, bin counts that add up
    to each parameter's size, finite numbers, the per-pixel map where there is one), or None.
    Reads back the summaries of a checkpoint."""
    where = f"importance[{task}]"
    pixels = _pixel_weight(model, input_shape)
    keys = {"task", "layers"} | ({"input_importance"} if pixels in names else set())
    if not isinstance(summary, dict) or set(summary) != keys or summary["task"] != task:
        return f"'{where}' should be the summary of task {task} with the keys {sorted(keys)}"
    layers, labels = summary["layers"], parameter_labels(model)
    params = dict(model.named_parameters())
    if not isinstance(layers, dict) or set(layers) != set(names):
        return f"'{where}.layers' should hold the regularized parameters {list(names)}"
    for name, layer in layers.items():
        ok = isinstance(layer, dict) and set(layer) == _LAYER_KEYS
        ok = ok and layer["label"] == labels.get(name, name)
        ok = ok and _counts(layer["counts"], _BINS) and _counts([layer["zeros"]], 1)
        ok = ok and sum(layer["counts"]) + layer["zeros"] == params[name].numel()
        ok = ok and _numbers(layer["log10_edges"], _BINS + 1)
        ok = ok and _numbers([layer["mean"], layer["max"]], 2)
        if not ok:
            return f"'{where}.layers.{name}' is not a histogram of that parameter's importance"
    if pixels in names:
        image = summary["input_importance"]
        shape = list(input_shape[1:])
        if not isinstance(image, dict) or image.get("shape") != shape:
            return f"'{where}.input_importance.shape' should be {shape}"
        if not _numbers(image.get("values"), math.prod(shape)):
            return f"'{where}.input_importance.values' should be {math.prod(shape)} numbers"
    return None


def _counts(values: Any, n: int) -> bool:
    """Whether ``values`` is a list of ``n`` ints >= 0."""
    return (
        isinstance(values, list)
        and len(values) == n
        and all(type(v) is int and v >= 0 for v in values)
    )


def _numbers(values: Any, n: int) -> bool:
    """Whether ``values`` is a list of ``n`` finite numbers."""
    return (
        isinstance(values, list)
        and len(values) == n
        and all(type(v) in (int, float) and math.isfinite(v) for v in values)
    )
