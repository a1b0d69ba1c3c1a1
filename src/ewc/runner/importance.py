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
    first = next((m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)), None)
    if isinstance(first, nn.Linear) and len(input_shape) == 3:
        name = next(n for n, p in model.named_parameters() if p is first.weight)
        if name in importance:
            pixels = importance[name].detach().sum(0).reshape(tuple(input_shape)).sum(0)
            summary["input_importance"] = {
                "shape": list(pixels.shape),
                "values": [float(v) for v in pixels.flatten()],
            }
    return summary
