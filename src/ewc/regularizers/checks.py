"""Argument and state checks shared by the regularizers: each raises ``ValueError`` naming the
bad value and the fix, before anything changes."""

from __future__ import annotations

import math
import reprlib
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ewc import fsdp
from ewc.config import RANGES
from ewc.fisher.core import unwrap

MODES = ("separate", "online")
#: λ's range, the run settings' (:data:`ewc.config.RANGES`): finite, >= 0, at most the largest
#: float32.
LAM_RANGE = RANGES["lam"]
LAM_MAX = float(LAM_RANGE.high or math.inf)


def check_lam(lam: float) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam):
        raise ValueError(f"lam must be a finite number >= 0; got lam={lam!r}.")
    if lam < 0:
        raise ValueError(
            f"lam must be >= 0; got lam={lam!r}. The penalty is (lam/2)·Σ Ω (θ-θ*)²: a "
            "negative lam would reward forgetting."
        )
    if lam not in LAM_RANGE:
        raise ValueError(
            f"lam must be <= {LAM_MAX:.9g} (the largest float32, so that λ·Ω stays "
            f"representable; the run settings' bound too); got lam={lam!r}."
        )
    return float(lam)


def trainable(model: Any, owner: str) -> tuple[nn.Module, dict[str, Tensor]]:
    """``model`` without a DDP / DataParallel wrapper, and its parameters with
    ``requires_grad=True`` by name; ``ValueError`` naming ``owner`` (the regularizer) for
    something that is not an ``nn.Module`` or a model with nothing to regularize."""
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"{owner} needs the model (a torch.nn.Module) as its first argument; got "
            f"{type(model).__name__} {reprlib.repr(model)}."
        )
    model = unwrap(model)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters (requires_grad=True); "
            "there is nothing to regularize. Unfreeze some parameters first."
        )
    return model, params


def warn_at_consolidate(
    params: Mapping[str, Tensor], importance: Mapping[str, Tensor], owner: str
) -> None:
    """Warn, at the end of a task, about parameters frozen since ``owner`` was built (they keep
    their old importance and anchor) and about an importance that is zero everywhere (e.g. every
    label ignored, -100): the penalty then protects nothing of this task."""
    frozen = [n for n, p in params.items() if not p.requires_grad]
    if frozen:
        warnings.warn(
            f"{owner}: parameter(s) {frozen[:5]}{' ...' if len(frozen) > 5 else ''} were frozen "
            "after the regularizer was built: they get importance 0 from this task and no "
            "penalty while frozen. Unfreeze them before consolidate(), or build the "
            "regularizer after freezing to leave them out.",
            stacklevel=3,
        )
    if importance and all(not bool(t.any()) for t in importance.values()):
        warnings.warn(
            f"{owner}: this task's importance is zero for every parameter, so the penalty does "
            "not protect it (were all labels ignored, e.g. -100, or the data empty of signal?). "
            "Check the batches given to consolidate().",
            stacklevel=3,
        )


def check_gamma(gamma: Any) -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
        raise ValueError(
            f"gamma must lie in (0, 1]; got gamma={gamma!r}. It is the online decay "
            "Ω̄ ← γ·Ω̄ + Ω_t (1 = no forgetting of old importance)."
        )
    return float(gamma)


def check_fisher_samples(value: Any) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(
            f"fisher_samples must be a positive int or None (all samples); got "
            f"fisher_samples={value!r}."
        )
    return value


def check_state_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(
            f"state_dtype must be a floating torch.dtype or None; got state_dtype={dtype!r}. "
            "Pass e.g. torch.bfloat16, or None to store the state in the parameters' dtype."
        )
    return dtype


def check_mode_gamma(mode: str, gamma: float) -> tuple[str, float]:
    if mode not in MODES:
        raise ValueError(f"unknown mode={mode!r}; choose one of {', '.join(MODES)}.")
    check_gamma(gamma)
    if mode == "separate" and gamma != 1:
        raise ValueError(
            f"gamma={gamma!r} only applies with mode='online'; pass mode='online' "
            "(or use OnlineEWC), or leave gamma at 1."
        )
    return mode, float(gamma)


def check_positive(name: str, value: Any, hint: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number; got {name}={value!r}. {hint}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0; got {name}={value!r}. {hint}")
    return float(value)


def check_names_shapes(
    tensors: Mapping[str, Any], params: Mapping[str, Tensor], what: str, partial: bool
) -> None:
    unknown = sorted(set(tensors) - set(params))
    missing = [] if partial else [n for n in params if n not in tensors]
    wrong = [
        f"{n}: {tuple(getattr(tensors[n], 'shape', ()))} vs parameter {tuple(p.shape)}"
        for n, p in params.items()
        if n in tensors and (not isinstance(tensors[n], Tensor) or tensors[n].shape != p.shape)
    ]
    if unknown or missing or wrong:
        parts = [
            f"names not among the model's trainable parameters: {unknown}" if unknown else "",
            f"missing parameters: {missing}" if missing else "",
            f"shape mismatches: {wrong}" if wrong else "",
        ]
        if what.startswith("state dict"):
            fix = "rebuild the model (and freeze the same parameters) as when the state was saved"
        else:
            fix = (
                "the regularizer holds the parameters that had requires_grad=True when it was "
                "built: build it after freezing or unfreezing"
            )
        raise ValueError(
            f"{what} does not match the model: " + "; ".join(p for p in parts if p) + ". "
            f"The regularized parameters are {list(params)}; {fix}."
        )


def check_finite(tensors: Mapping[str, Tensor], what: str) -> None:
    local = [fsdp.local(t) for t in tensors.values()]
    counts = fsdp.summed([int((~torch.isfinite(t)).sum()) for t in local], tensors.values())
    bad = [n for n, c in zip(tensors, counts, strict=True) if c]
    if bad:
        raise ValueError(
            f"{what} has NaN or Inf values in {bad}. Check the model's outputs and the data "
            "(a diverged model, log(0) in a custom likelihood, or lr too large)."
        )
