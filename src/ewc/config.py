"""Checking run settings, whichever way they arrive (Python, a YAML/TOML file, a flag).

:func:`check_fields` coerces each field of a dataclass to its annotated type, or refuses it, and
checks it against :data:`RANGES`; :class:`ewc.runner.RunConfig` calls it on construction, so a
bad value is refused before any data is loaded. Coercion is lossless only: ``"1e4"`` or ``10000``
for a float, ``2.0`` or ``"2"`` for an int, ``"400,400"`` or ``[400, 400]`` for a tuple of ints,
``"true"`` for a bool. ``True`` is never a number and ``2.5`` never an int.

Needs nothing but the standard library (and torch for devices), so it works without extras.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
import reprlib
import sys
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ewc import _optional

__all__ = [
    "RANGES",
    "ConfigError",
    "Range",
    "check_device",
    "check_fields",
    "read_config_file",
]

_BOOLS = {"true": True, "false": False}


class ConfigError(ValueError):
    """A run setting that cannot work; the message names the key, the value and what is expected."""


@dataclass(frozen=True)
class Range:
    """Allowed values ``low <= v <= high`` (``<`` where ``*_open``); ``None``: unbounded."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        parts = []
        if self.low is not None:
            parts.append(f"{'>' if self.low_open else '>='} {self.low:.9g}")
        if self.high is not None:
            parts.append(f"{'<' if self.high_open else '<='} {self.high:.9g}")
        return " and ".join(parts)


_POSITIVE = Range(0, low_open=True)
_AT_LEAST_ONE = Range(1, 2**63 - 1)  # the int64 range of torch's sizes
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)

#: Field -> allowed range, for the numeric fields of :class:`ewc.runner.RunConfig` (and the
#: entries of ``hidden``). λ is bounded by the largest float32 so that λ·Ω stays representable.
RANGES: dict[str, Range] = {
    "n_tasks": _AT_LEAST_ONE,
    "hidden": Range(1, 2**31 - 1),  # wider, a layer's size overflows before it is allocated
    "epochs": _POSITIVE,
    "iterations": _AT_LEAST_ONE,
    "batch_size": _AT_LEAST_ONE,
    "lr": _POSITIVE,
    "lam": Range(0, _FLOAT32_MAX),
    "gamma": Range(0, 1, low_open=True),
    "xi": _POSITIVE,
    "fisher_samples": _AT_LEAST_ONE,
    "seed": Range(0, 2**63 - 1),
    "eval_every": _AT_LEAST_ONE,
    "curve_samples": _AT_LEAST_ONE,
    "val_fraction": Range(0, 1, high_open=True),
    "max_train_samples": _AT_LEAST_ONE,
}


def check_fields(obj: Any) -> None:
    """Coerce every field of dataclass ``obj`` in place to its annotated type and check it
    against :data:`RANGES`.

    Raises :class:`ConfigError` naming the first bad field, its value and what it expects.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = _coerce(f.name, getattr(obj, f.name), hints[f.name])
        limits = RANGES.get(f.name)
        items = value if isinstance(value, tuple) else (value,)
        if limits is not None and any(v is not None and v not in limits for v in items):
            kind = "an integer" if isinstance(items[0], int) else "a finite number"
            raise ConfigError(f"{f.name}: expected {kind} {limits}, got {_show(value)}")
        setattr(obj, f.name, value)


def did_you_mean(value: Any, choices: Iterable[Any]) -> str:
    """``" (did you mean 'ewc'?)"`` for the choice closest to a mistyped ``value``, else ``""``."""
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_device(name: str) -> torch.device:
    """``name`` as a torch device that exists here, or :class:`ConfigError` saying what does."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device: {name!r} asked for, but CUDA is not available; use cpu")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device: {name!r} does not exist; this machine has {count} GPU(s)")
    return device


def _show(value: Any) -> str:
    """A short repr: long or deeply nested values are abbreviated."""
    return reprlib.repr(value)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """``value`` as type ``hint`` (``X``, ``X | None``, ``tuple[int, ...]``, ``dict[...]``)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (hint,) = [a for a in args if a is not type(None)]
    origin = typing.get_origin(hint) or hint
    if origin is tuple:
        return _int_tuple(name, value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {_show(value)}")
        return value
    return _scalar(name, value, origin)


def _scalar(name: str, value: Any, typ: type) -> Any:
    if typ is str:
        if isinstance(value, str | os.PathLike):
            return os.fspath(value)
        raise ConfigError(f"{name}: expected a string, got {_show(value)}")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOLS:
            return _BOOLS[value.lower()]
        raise ConfigError(f"{name}: expected true or false, got {_show(value)}")
    if typ not in (int, float):
        if isinstance(value, typ):
            return value
        raise ConfigError(f"{name}: expected a {typ.__name__}, got {_show(value)}")
    number = _number(value)
    if isinstance(number, float) and number.is_integer() and typ is int:
        number = int(number)
    if isinstance(number, int) and typ is int:
        return number
    if number is not None and typ is float:
        with contextlib.suppress(OverflowError):  # an int beyond the float range
            return float(number)
    expected = "an integer" if typ is int else "a number"
    raise ConfigError(f"{name}: expected {expected}, got {_show(value)}")


def _number(value: Any) -> int | float | None:
    """An int or float from a number or numeric string (``"1e4"``, ``"7"``); None otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        for parse in (int, float):
            try:
                return parse(value.strip())
            except ValueError:
                pass
    return None


def _int_tuple(name: str, value: Any) -> tuple[int, ...]:
    """A tuple of ints from ``[400, 400]``, ``"400,400"`` or ``400``."""
    if isinstance(value, str):
        items = value.split(",")
        if not all(v.strip() for v in items):
            raise ConfigError(
                f"{name}: expected comma-separated integers, e.g. 400,400, got {_show(value)} "
                "(an empty item)"
            )
        value = items
    elif _number(value) is not None:
        value = [value]
    if not isinstance(value, list | tuple):
        raise ConfigError(
            f"{name}: expected a list of integers, e.g. [400, 400], got {_show(value)}"
        )
    if not value:
        raise ConfigError(
            f"{name}: expected at least one integer, e.g. [400, 400], got {_show(value)}"
        )
    return tuple(_scalar(f"{name}[{i}]", v, int) for i, v in enumerate(value))


def read_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping in a YAML (1.2: ``1e4`` is a number) or TOML file, keys with ``-`` read as
    ``_``. Raises :class:`ConfigError` naming the file and the line for an unreadable file, a
    syntax error, a duplicate key or a document that is not a mapping. Needs ``ewc[cli]``."""
    name = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {name!r}: {e}") from None
    try:
        data = _parse_toml(text) if name.endswith(".toml") else _parse_yaml(text)
    except RecursionError:
        raise ConfigError(f"config file {name!r} is nested too deeply") from None
    except ValueError as e:  # the parsers' errors, reworded below
        raise ConfigError(f"config file {name!r} does not parse: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {name!r} must hold a mapping of RunConfig fields")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _parse_toml(text: str) -> Any:
    toml = _optional.require("tomllib" if sys.version_info >= (3, 11) else "tomli", "cli")
    return toml.loads(text)  # TOMLDecodeError is a ValueError; duplicate keys are errors


def _parse_yaml(text: str) -> Any:
    """ruamel.yaml reads YAML 1.2 (``1e4`` a float, ``yes`` a string) and refuses duplicate
    keys; its errors become ValueErrors with the problem and its line."""
    yaml = _optional.require("ruamel.yaml", "cli")
    try:
        return yaml.YAML(typ="safe", pure=True).load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ValueError(f"{getattr(e, 'problem', None) or e}{where}") from None
