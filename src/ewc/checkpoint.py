"""In-run checkpoints: the whole state of a run after each task, so that a run killed at any
moment resumes after its last finished task and ends with the same results, bit for bit on CPU,
as a run never interrupted.

A checkpoint holds the run's config, the number of tasks finished, the model, optimizer and
regularizer states, the random number generators' states and the partial results. It is written
atomically (a temporary file renamed into place; under torchrun by rank 0 only) as one header
line, ``ewc.checkpoint/2 sha256=<hex>``, the SHA-256 of what follows, then ``torch.save``'s bytes,
read with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts, never
code.

:func:`resume` checks a checkpoint as a whole before using any of it: the hash, the schema, the
config it belongs to, ``tasks_done`` against the run's tasks, every model and optimizer tensor
against the model being built (names, shapes, dtypes, finite values), the optimizer's settings,
the regularizer's state (its own checks, and its hyper-parameters against the config), the random
generators' states, and the partial results (the caller's ``check_partial``). A checkpoint that
fails any check is ignored with a warning naming its path and why, and the run starts over.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ewc import distributed
from ewc.readback import DamagedFileError, read_bytes, read_torch, short, tensor_mismatch
from ewc.regularizers import Regularizer
from ewc.results import atomic_write_bytes

__all__ = [
    "CHECKPOINT_SCHEMA",
    "CheckpointError",
    "checkpoint_path",
    "read",
    "remove_checkpoint",
    "resume",
    "save",
]

CHECKPOINT_SCHEMA = "ewc.checkpoint/2"
_HEADER = CHECKPOINT_SCHEMA.encode() + b" sha256="
#: The keys of a checkpoint's state.
_KEYS = (
    "config",
    "tasks_done",
    "model",
    "optimizer",
    "regularizer",
    "generator",
    "torch_rng",
    "cuda_rng",
    "partial",
)


#: The per-parameter state keys of the optimizers the runner builds, once they have stepped.
_STATE_KEYS = {"Adam": {"step", "exp_avg", "exp_avg_sq"}}


class CheckpointError(DamagedFileError):
    """A checkpoint that cannot be used: unreadable, damaged, edited, or not of this run."""


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
    values = (
        config,
        tasks_done,
        model.state_dict(),
        optimizer.state_dict(),
        None if regularizer is None else regularizer.state_dict(),
        generator.get_state(),
        torch.get_rng_state(),
        torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        partial,
    )
    write(path, dict(zip(_KEYS, values, strict=True)))


def write(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write ``state`` (the keys of a checkpoint) under the header with its hash, atomically."""
    buffer = io.BytesIO()
    torch.save({"schema": CHECKPOINT_SCHEMA, **state}, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    atomic_write_bytes(path, _HEADER + digest + b"\n" + payload)


def read(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The state in the checkpoint at ``path``, its hash and schema checked (not yet its values:
    :func:`resume` checks those against the run). Raises :class:`CheckpointError` naming it."""
    data = read_bytes(path, "checkpoint", CheckpointError)
    header, _, payload = data.partition(b"\n")
    if not header.startswith(_HEADER):
        raise CheckpointError(
            f"checkpoint {str(path)!r}: it does not start with the {CHECKPOINT_SCHEMA!r} header "
            "and hash (written by another version of ewc, or not a checkpoint)"
        )
    if hashlib.sha256(payload).hexdigest().encode() != header.removeprefix(_HEADER):
        raise CheckpointError(
            f"checkpoint {str(path)!r}: its content does not match the hash written with it "
            "(truncated, damaged or edited)"
        )
    state = read_torch(path, "checkpoint", CheckpointError, data=payload)
    problem = _mismatch_keys(state)
    if problem is not None:
        raise CheckpointError(f"checkpoint {str(path)!r}: {problem}")
    return state


def _mismatch_keys(state: Any) -> str | None:
    if not isinstance(state, dict) or state.get("schema") != CHECKPOINT_SCHEMA:
        return f"'schema' should be {CHECKPOINT_SCHEMA!r}"
    missing = [k for k in _KEYS if k not in state]
    return f"key {missing[0]!r} is missing" if missing else None


def resume(
    path: str | os.PathLike[str],
    config: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    regularizer: Regularizer | None,
    generator: torch.Generator,
    n_tasks: int | None = None,
    check_partial: Callable[[Any, int], str | None] | None = None,
) -> tuple[int, dict[str, Any]] | None:
    """Restore the model, optimizer, regularizer and generators from the checkpoint at ``path``
    and return ``(tasks_done, partial)``; None (nothing restored) when there is no checkpoint
    there for ``config``.

    ``n_tasks``: the run's number of tasks (``tasks_done`` must lie in 1 .. n_tasks - 1);
    ``check_partial(partial, tasks_done)``: what is wrong with the partial results, or None.
    Everything is checked before anything is restored; a checkpoint that fails is ignored with a
    warning naming it and why."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        state = read(path)
        if state["config"] != config:
            warnings.warn(
                f"ignoring checkpoint {str(path)!r}: saved for another config", stacklevel=2
            )
            return None
        problem = (
            _tasks_problem(state["tasks_done"], n_tasks)
            or _tensors_problem(state["model"], model.state_dict(), "model")
            or _optimizer_problem(state["optimizer"], optimizer)
            or _regularizer_problem(state["regularizer"], regularizer, state["tasks_done"])
            or _rng_problem(state)
            or (check_partial(state["partial"], state["tasks_done"]) if check_partial else None)
        )
        if problem is not None:
            raise CheckpointError(f"checkpoint {str(path)!r}: {problem}")
        if regularizer is not None:  # checks its state before it changes anything
            try:
                regularizer.load_state_dict(state["regularizer"])
            except ValueError as e:
                raise CheckpointError(f"checkpoint {str(path)!r}: 'regularizer': {e}") from None
    except CheckpointError as e:
        warnings.warn(f"ignoring {e}; the run starts over from its first task", stacklevel=2)
        return None
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["tasks_done"], state["partial"]


def _tasks_problem(tasks_done: Any, n_tasks: int | None) -> str | None:
    high = "" if n_tasks is None else f" and <= {n_tasks - 1} (the run has {n_tasks} tasks)"
    if (
        isinstance(tasks_done, bool)
        or not isinstance(tasks_done, int)
        or tasks_done < 1
        or (n_tasks is not None and tasks_done >= n_tasks)
    ):
        return f"'tasks_done' should be an integer >= 1{high}, not {short(tasks_done)}"
    return None


def _tensors_problem(saved: Any, own: Mapping[str, Tensor], where: str) -> str | None:
    """How the tensors ``saved`` differ from ``own`` (names, shapes, dtypes, finite values)."""
    if not isinstance(saved, dict):
        return f"{where!r} should be a mapping of tensors, not {type(saved).__name__}"
    if set(saved) != set(own):
        extra, missing = sorted(set(saved) - set(own)), sorted(set(own) - set(saved))
        return f"{where!r} should hold {short(sorted(own))}; missing {missing}, unknown {extra}"
    return next(
        (p for n, t in own.items() if (p := tensor_mismatch(saved[n], t, f"{where}.{n}"))), None
    )


def _optimizer_problem(saved: Any, optimizer: torch.optim.Optimizer) -> str | None:
    """How ``saved`` differs from a state of ``optimizer``: its groups and settings (which the
    config fixes), and per parameter, state tensors of the parameter's shape, finite."""
    own = optimizer.state_dict()
    if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list):
        return "'optimizer' should be a mapping with 'state' and 'param_groups'"
    groups = saved["param_groups"]
    if len(groups) != len(own["param_groups"]):
        return f"'optimizer.param_groups' should hold {len(own['param_groups'])} group(s)"
    for i, (group, mine) in enumerate(zip(groups, own["param_groups"], strict=True)):
        if not isinstance(group, dict) or group.keys() != mine.keys():
            return f"'optimizer.param_groups[{i}]' should have the keys {sorted(mine)}"
        differ = next((k for k in mine if group[k] != mine[k]), None)
        if differ is not None:
            return (
                f"'optimizer.param_groups[{i}].{differ}' should be {short(mine[differ])} (the "
                f"run's), not {short(group[differ])}"
            )
    state = saved.get("state")
    if not isinstance(state, dict):
        return "'optimizer.state' should be a mapping"
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if state and set(state) != set(range(len(params))):
        return f"'optimizer.state' should hold the state of every parameter, 0 to {len(params) - 1}"
    first: Any = next(iter(state.values()), {})
    keys = _STATE_KEYS.get(
        type(optimizer).__name__, set(first) if isinstance(first, dict) else set()
    )
    for index, entry in state.items():
        where = f"optimizer.state.{index}"
        if not isinstance(index, int) or not 0 <= index < len(params):
            return f"'optimizer.state' names parameter {short(index)} of {len(params)}"
        if not isinstance(entry, dict) or set(entry) != keys:
            return f"{where!r} should be a mapping with the keys {sorted(keys)}"
        for key, value in entry.items():
            problem = _optimizer_value_problem(value, params[index], f"{where}.{key}")
            if problem is not None:
                return problem
    return None


def _optimizer_value_problem(value: Any, param: Tensor, where: str) -> str | None:
    """A per-parameter optimizer value: a step count (a number or 0-dim tensor >= 0) or a buffer
    shaped like the parameter, finite."""
    if (isinstance(value, Tensor) and value.dim() == 0) or isinstance(value, int | float):
        number = float(value)
        ok = number == number and 0 <= number < float("inf")
        return None if ok and not isinstance(value, bool) else f"{where!r} should be >= 0"
    return tensor_mismatch(value, param.detach(), where)


def _regularizer_problem(
    saved: Any, regularizer: Regularizer | None, tasks_done: int
) -> str | None:
    """Whether ``saved`` is a state of ``regularizer`` after ``tasks_done`` tasks, with the
    hyper-parameters the config gave it (its ``load_state_dict`` checks the tensors)."""
    if regularizer is None:
        return None if saved is None else "'regularizer' should be empty: the run has none"
    own = regularizer.state_dict()
    if not isinstance(saved, dict) or saved.get("type") != own.get("type"):
        return f"'regularizer' should be a {own.get('type')} state"
    if saved.get("n_tasks") != tasks_done:
        return f"'regularizer.n_tasks' should be {tasks_done}, not {short(saved.get('n_tasks'))}"
    missing = sorted(set(own) - set(saved))  # load_state_dict fills some for older states
    if missing:
        return f"'regularizer' lacks {missing}"
    # Hyper-parameters, not state: the merged constant and EWC's stats (a JSON string) vary.
    state_values = ("constant", "stats")
    settings = [k for k, v in own.items() if isinstance(v, str | float) and k not in state_values]
    differ = next((k for k in settings if saved.get(k) != own[k]), None)
    if differ is not None:
        return f"'regularizer.{differ}' should be {short(own[differ])} (the run's setting)"
    return None


def _rng_problem(state: dict[str, Any]) -> str | None:
    """Whether the generators' states are states torch accepts."""
    for key in ("generator", "torch_rng"):
        try:
            torch.Generator().set_state(state[key])
        except (TypeError, RuntimeError, ValueError):
            return f"{key!r} should be the state of a CPU random generator"
    cuda = state["cuda_rng"]
    if not isinstance(cuda, list) or any(
        not isinstance(s, Tensor) or s.dtype != torch.uint8 for s in cuda
    ):
        return "'cuda_rng' should be a list of CUDA generator states"
    return None


def remove_checkpoint(path: str | os.PathLike[str]) -> None:
    """Delete the checkpoint at ``path``, if any (once the run's results are saved); under
    torchrun, rank 0 does, as it wrote it."""
    if distributed.is_main_process():
        Path(path).unlink(missing_ok=True)
