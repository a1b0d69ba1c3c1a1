"""Reading back the files ``ewc`` wrote: results and sweep JSON, run checkpoints, the trainer
callbacks' state and saved regularizer states.

Every file is read the same way: parsed without running code (JSON with duplicate keys
refused; ``torch.load(weights_only=True)``, whose errors are reworded), its schema checked
(:func:`mismatch` against a spec), then its values checked against what will use them, and
only then used. Every failure is a :class:`DamagedFileError` (a ``ValueError``) whose message
names the file, the field and what was expected.
"""

from __future__ import annotations

import io
import json
import os
import reprlib
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ewc.config import Range

__all__ = [
    "DamagedFileError",
    "existing_folder",
    "mismatch",
    "read_json",
    "read_regularizer_state",
    "read_torch",
    "tensor_mismatch",
]


class DamagedFileError(ValueError):
    """A file that does not read back as ``ewc`` wrote it: damaged, truncated, edited, or never
    one of ours. The message names the file, the field and what was expected."""


def short(value: Any) -> str:
    """A short repr of ``value`` for a message."""
    return reprlib.repr(value)


def existing_folder(path: str | os.PathLike[str], what: str, fix: str) -> Path:
    """``path`` as a ``Path`` if it is a folder; else ``FileNotFoundError`` saying that the
    ``what`` (e.g. ``"model folder"``) is a file or does not exist, and ``fix``."""
    folder = Path(path)
    if not folder.is_dir():
        state = "is a file, not a folder" if folder.exists() else "does not exist"
        raise FileNotFoundError(f"{what} {str(folder)!r} {state}; {fix}")
    return folder


def read_bytes(
    path: str | os.PathLike[str], what: str, error: type[DamagedFileError] = DamagedFileError
) -> bytes:
    """The bytes of ``path``; FileNotFoundError or ``error`` naming it as ``what``."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist") from None
    except OSError as e:
        raise error(f"cannot read {what} {str(path)!r}: {e.strerror or e}") from None


def read_json(
    path: str | os.PathLike[str], what: str, error: type[DamagedFileError] = DamagedFileError
) -> Any:
    """The JSON document in ``path``; a duplicate key in any object, NaN/Infinity, bad UTF-8 or
    bad syntax raise ``error`` naming the file."""
    data = read_bytes(path, what, error)
    try:
        return json.loads(
            data.decode("utf-8"), parse_constant=_no_constant, object_pairs_hook=_unique_keys
        )
    except RecursionError:
        raise error(f"{what} {str(path)!r} is nested too deeply to be one of ours") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, a duplicate key
        raise error(f"{what} {str(path)!r} is not valid JSON ({e}); rerun the experiment") from None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict, refusing a key given twice (json keeps the last silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


def read_torch(
    path: str | os.PathLike[str],
    what: str,
    error: type[DamagedFileError] = DamagedFileError,
    data: bytes | None = None,
) -> Any:
    """What ``torch.save`` wrote to ``path`` (or ``data``, its bytes), read with
    ``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts, never code.
    A truncated or damaged file, or one holding other objects, raises ``error`` naming it."""
    if data is None:
        data = read_bytes(path, what, error)
    try:
        with warnings.catch_warnings():  # torch's notes on foreign pickles: the error says it
            warnings.simplefilter("ignore")
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:
        if "weights_only" in str(e) or "Unpickl" in type(e).__name__:
            # torch's advice here (weights_only=False) would run the file's code: never that.
            why = "it holds objects other than tensors, numbers, strings, lists and dicts"
        else:
            why = f"it is truncated or damaged ({type(e).__name__}: {_first_line(e)})"
        raise error(
            f"{what} {str(path)!r} cannot be read: {why}, so it is not a file ewc wrote as it was "
            "written"
        ) from None


def read_regularizer_state(
    path: str | os.PathLike[str], regularizer: Any = None, what: str = "regularizer state"
) -> dict[str, Any]:
    """A regularizer's ``state_dict()`` saved with ``torch.save(reg.state_dict(), path)``, read
    without running code and checked to be a state (a mapping with an int ``n_tasks``); with
    ``regularizer``, loaded into it (its ``load_state_dict`` checks every key, name, shape and
    value before changing anything). Raises :class:`DamagedFileError` naming the file and what
    is wrong."""
    state = read_torch(path, what)
    if not isinstance(state, dict) or type(state.get("n_tasks", 0)) is not int:
        raise DamagedFileError(
            f"{what} {str(path)!r}: should be a regularizer state (a mapping with 'type', "
            f"'n_tasks', ...), not {type(state).__name__}"
        )
    if regularizer is not None:
        try:
            regularizer.load_state_dict(state)
        except ValueError as e:
            raise DamagedFileError(f"{what} {str(path)!r} cannot be loaded: {e}") from None
    return state


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else "no message"


def tensor_mismatch(value: Any, like: Tensor, where: str) -> str | None:
    """How ``value`` differs from a tensor of ``like``'s shape and dtype holding finite values
    (a non-float tensor needs no finiteness), or None."""
    if not isinstance(value, Tensor):
        return f"{where!r} should be a tensor, not {type(value).__name__}"
    if value.shape != like.shape:
        return f"{where!r} should have shape {list(like.shape)}, not {list(value.shape)}"
    if value.dtype != like.dtype:
        return f"{where!r} should be {like.dtype}, not {value.dtype}"
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        return f"{where!r} holds NaN or Inf values"
    return None


# A spec is a type (or tuple of types), a Range (a finite number in it), [spec] (a list of such
# items), {key: spec} (a mapping with these keys; "key?" optional; other keys allowed) or
# {"*": spec} (a mapping whose every value matches).


def mismatch(value: Any, spec: Any, where: str = "") -> str | None:
    """Where ``value`` first departs from ``spec`` and how, or None; ``where`` is the path of
    ``value`` in its document followed by a dot (``"curves."``), empty for the document."""
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            return f"{where.rstrip('.') or 'the document'} should be a mapping, not {short(value)}"
        keys = (
            [(k, spec["*"], False) for k in value]
            if list(spec) == ["*"]
            else [(k.rstrip("?"), item, k.endswith("?")) for k, item in spec.items()]
        )
        for name, item, optional in keys:
            if name not in value:
                if optional:
                    continue
                return f"key {where + str(name)!r} is missing"
            problem = mismatch(value[name], item, f"{where}{name}.")
            if problem is not None:
                return problem
        return None
    where = where.rstrip(".")
    if isinstance(spec, list):
        if not isinstance(value, list):
            return f"{where!r} should be a list, not {short(value)}"
        return next(
            (p for i, v in enumerate(value) if (p := mismatch(v, spec[0], f"{where}[{i}]."))),
            None,
        )
    specs = spec if isinstance(spec, tuple) else (spec,)
    if any(_matches(value, s) for s in specs):
        return None
    return f"{where!r} should be {' or '.join(map(_describe, specs))}, not {short(value)}"


def _matches(value: Any, spec: Any) -> bool:
    if isinstance(value, bool) and spec is not bool:
        return False  # JSON true is not a number
    if isinstance(spec, Range):
        return isinstance(value, int | float) and value in spec
    return isinstance(value, spec)


def _describe(spec: Any) -> str:
    if isinstance(spec, Range):
        return f"a number {spec}".rstrip()
    names = {str: "a string", int: "an integer", bool: "true or false", type(None): "null"}
    return names.get(spec, spec.__name__)
