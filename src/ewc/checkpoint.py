"""In-run checkpoints: the whole state of a run after each task, so that a run killed at any
moment resumes after its last finished task and ends with the same results, bit for bit on CPU,
as a run never interrupted.

A checkpoint holds the run's config, the number of tasks finished, the model, optimizer and
regularizer states, the random number generators' states and the partial results. It is written
atomically (a temporary file renamed into place; under torchrun by rank 0 only) and read with
``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts, never code. A
checkpoint saved for another config is ignored (and replaced by the run's first checkpoint).
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ewc import distributed
from ewc.regularizers import Regularizer
from ewc.results import atomic_write_bytes

__all__ = ["CHECKPOINT_SCHEMA", "checkpoint_path", "remove_checkpoint", "resume", "save"]

CHECKPOINT_SCHEMA = "ewc.checkpoint/1"


def checkpoint_path(results_path: str | os.PathLike[str]) -> Path:
    """Where the checkpoint of the run whose results go to ``results_path`` lives:
    ``runs/ewc-seed0.json`` -> ``runs/ewc-seed0.ckpt.pt``."""
    return Path(results_path).with_suffix(".ckpt.pt")


def save(
    path: str | os.PathLike[str],
    config: dict[str, Any],
    tasks_done: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    regularizer: Regularizer | None,
    generator: torch.Generator,
    partial: dict[str, Any],
) -> None:
    """Write the state of a run of ``config`` after ``tasks_done`` tasks; ``partial`` holds its
    partial results (lists and dicts of numbers and strings)."""
    state = {
        "schema": CHECKPOINT_SCHEMA,
        "config": config,
        "tasks_done": tasks_done,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "regularizer": None if regularizer is None else regularizer.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "partial": partial,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def resume(
    path: str | os.PathLike[str],
    config: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    regularizer: Regularizer | None,
    generator: torch.Generator,
) -> tuple[int, dict[str, Any]] | None:
    """Restore the model, optimizer, regularizer and generators from the checkpoint at ``path``
    and return ``(tasks_done, partial)``; None (nothing restored) when there is no checkpoint
    there for ``config``. An unreadable checkpoint is ignored with a warning."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        warnings.warn(f"ignoring unreadable checkpoint {str(path)!r}: {e}", stacklevel=2)
        return None
    if not isinstance(state, dict) or state.get("schema") != CHECKPOINT_SCHEMA:
        warnings.warn(f"ignoring {str(path)!r}: not an ewc checkpoint", stacklevel=2)
        return None
    if state["config"] != config:
        warnings.warn(f"ignoring checkpoint {str(path)!r}: saved for another config", stacklevel=2)
        return None
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if regularizer is not None:
        regularizer.load_state_dict(state["regularizer"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return int(state["tasks_done"]), state["partial"]


def remove_checkpoint(path: str | os.PathLike[str]) -> None:
    """Delete the checkpoint at ``path``, if any (once the run's results are saved); under
    torchrun, rank 0 does, as it wrote it."""
    if distributed.is_main_process():
        Path(path).unlink(missing_ok=True)
