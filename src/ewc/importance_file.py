r"""The importance file: a regularizer's importance and anchor on disk, with what produced them.

A folder with two files, written by :meth:`ewc.regularizers.QuadraticRegularizer.save_pretrained`
or ``ewc fisher`` and read by :func:`load_importance`:

* ``importance.safetensors``: per parameter, ``importance/<name>`` (:math:`\bar\Omega`, e.g. the
  diagonal Fisher, shaped like the parameter) and ``anchor/<name>`` (:math:`\bar\theta`, the
  weights the penalty pulls towards). safetensors: no pickle, nothing executes on loading.
* ``importance.json``: the format and its version, which strategy and Fisher kind produced the
  importance, from how many samples of which data, for which model class and parameters (names,
  shapes, dtypes), the ``ewc`` version, the λ convention the importance is meant for, how many
  tasks it merges (``mode``, ``gamma``) and ``normalize`` (``null``: the importance as
  computed). Both files carry the same random ``file_id``, so a pair from two different saves
  (a crash between the two writes, a file copied over) is refused.

A regularizer starts from a file as its "task 0": :meth:`ImportanceFile.apply_to` merges the
file's importance and anchor as one consolidated task (``EWC.from_pretrained(model, folder,
lam=...)`` and the trainer callbacks' ``start_from=folder`` do this).

Names are matched after removing the prefixes that wrappers add (``module.`` of DDP,
``base_model.model.`` of PEFT) and PEFT's ``.base_layer`` (the weight a LoRA layer wraps), so a
file of a plain model applies to the same model inside a PEFT wrapper. What applies is what the
regularizer regularizes: the parameters that require grad. A file entry for a frozen parameter
(a base weight under a LoRA adapter) cannot matter, because a frozen weight never moves: such
entries are skipped with a warning, and a file none of whose entries is trainable is refused
(docs/integrations/language-models.md, "LoRA").
"""

from __future__ import annotations

import json
import math
import os
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ewc.readback import existing_folder
from ewc.results import atomic_write_bytes, atomic_write_text

if TYPE_CHECKING:
    from ewc.regularizers.base import QuadraticRegularizer

__all__ = [
    "FORMAT",
    "LAMBDA_CONVENTION",
    "META_FILE",
    "TENSOR_FILE",
    "ImportanceFile",
    "ImportanceFileError",
    "canonical_name",
    "load_importance",
]

FORMAT = "ewc.importance"
VERSION = 1
TENSOR_FILE = "importance.safetensors"
META_FILE = "importance.json"
#: The penalty the stored importance is meant for.
LAMBDA_CONVENTION = "(lam/2)·Σ F (θ-θ*)², F the mean per-sample Fisher"
_PREFIXES = ("module.", "base_model.model.")


class ImportanceFileError(ValueError):
    """An importance folder that is not one of ours, is inconsistent, or does not fit a model;
    the message names the file and the field."""


@dataclass
class ImportanceFile:
    """Importance and anchor of a model's parameters, with their provenance.

    Attributes:
        importance: ``{parameter name: tensor shaped like the parameter}``, finite and >= 0
            (e.g. the mean per-sample diagonal Fisher, units 1/θ²).
        anchor: ``{parameter name: tensor}``, the same names and shapes: the weights
            (:math:`\\theta^*`) the penalty pulls towards.
        strategy: the strategy that computed the importance (``"ewc"``, ``"online-ewc"``,
            ``"mas"``, ``"si"``, ``"l2"``).
        fisher: the Fisher kind (``"exact"``, ``"sampled"``, ...) for EWC, else ``None``.
        n_samples: samples the importance was estimated from (``None``: not recorded).
        n_tasks: how many consolidated tasks the importance merges.
        mode, gamma: how they were merged (:class:`~ewc.regularizers.QuadraticRegularizer`).
        data: a free-form description of the data (path, sha256, format, max length, ...).
        model: a free-form description of the model; ``"class"`` at least.
        normalize: how the importance was normalised (``None``: as computed).
        ewc_version, created: the ``ewc`` version and the UTC time of writing (set on saving).
    """

    importance: dict[str, Tensor]
    anchor: dict[str, Tensor]
    strategy: str
    fisher: str | None = None
    n_samples: int | None = None
    n_tasks: int = 1
    mode: str = "separate"
    gamma: float = 1.0
    data: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    normalize: str | None = None
    ewc_version: str = ""
    created: str = ""

    @classmethod
    def of(
        cls,
        regularizer: QuadraticRegularizer,
        *,
        data: Mapping[str, Any] | None = None,
        n_samples: int | None = None,
    ) -> ImportanceFile:
        """The merged importance and anchor of ``regularizer`` with their provenance (what
        :meth:`~ewc.regularizers.QuadraticRegularizer.save_pretrained` writes); ``ValueError``
        before its first ``consolidate`` or for a bad ``n_samples``."""
        from ewc.regularizers.registry import REGULARIZERS

        if regularizer.n_tasks == 0:
            raise ValueError(
                f"{type(regularizer).__name__} has consolidated no task yet: there is no "
                "importance to save. Call consolidate(batches) first."
            )
        if n_samples is not None and (
            isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1
        ):
            raise ValueError(f"n_samples must be a positive int or None; got {n_samples!r}.")
        kind = type(regularizer)
        strategy = next((s.name for s in REGULARIZERS.values() if s.build is kind), kind.__name__)
        return cls(
            importance=dict(regularizer.importance),
            anchor=dict(regularizer.anchor),
            strategy=strategy,
            fisher=getattr(regularizer, "fisher", None),
            n_samples=n_samples,
            n_tasks=regularizer.n_tasks,
            mode=regularizer.mode,
            gamma=regularizer.gamma,
            normalize=getattr(regularizer, "normalize", None),  # EWC's (ewc.regularizers.scale)
            data=dict(data or {}),
            model={"class": type(regularizer.model).__name__},
        )

    def __post_init__(self) -> None:
        _check_tensors(self.importance, self.anchor, "ImportanceFile")

    @property
    def parameters(self) -> dict[str, dict[str, Any]]:
        """``{name: {"shape": [...], "dtype": "float32"}}`` of the stored parameters."""
        return {
            n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for n, t in self.importance.items()
        }

    def metadata(self) -> dict[str, Any]:
        """The JSON side of the file (without ``file_id``)."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "ewc_version": self.ewc_version,
            "created": self.created,
            "lambda_convention": LAMBDA_CONVENTION,
            "normalize": self.normalize,
            "strategy": self.strategy,
            "fisher": self.fisher,
            "n_samples": self.n_samples,
            "n_tasks": self.n_tasks,
            "mode": self.mode,
            "gamma": self.gamma,
            "data": self.data,
            "model": self.model,
            "parameters": self.parameters,
        }

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``importance.safetensors`` then ``importance.json`` into ``directory`` (created
        if needed), each atomically (a temporary file and a rename), both with one new
        ``file_id``. Only the main process writes under ``torch.distributed``. Returns the
        folder."""
        from safetensors.torch import save

        from ewc import __version__

        directory = Path(directory)
        if directory.exists() and not directory.is_dir():
            raise ImportanceFileError(f"{str(directory)!r} is a file; name a folder to write to")
        self.ewc_version = __version__
        self.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        file_id = uuid.uuid4().hex
        tensors = {f"importance/{n}": t for n, t in self.importance.items()}
        tensors.update({f"anchor/{n}": t for n, t in self.anchor.items()})
        blob = save(
            {k: t.detach().cpu().contiguous() for k, t in tensors.items()},
            metadata={"format": FORMAT, "file_id": file_id},
        )
        atomic_write_bytes(directory / TENSOR_FILE, blob)
        meta = {**self.metadata(), "file_id": file_id}
        atomic_write_text(
            directory / META_FILE,
            json.dumps(meta, indent=1, allow_nan=False, ensure_ascii=False) + "\n",
        )
        return directory

    def apply_to(self, regularizer: QuadraticRegularizer) -> None:
        """Merge this file into ``regularizer`` as one consolidated task (``add_task``: its
        importance and anchor; trainable parameters the file lacks get zero importance).

        Names are matched by :func:`canonical_name`. Raises :class:`ImportanceFileError` naming
        the parameters when a name is not in the model, a shape differs, or no entry is a
        trainable parameter; warns about entries for frozen parameters, which are skipped (a
        frozen weight cannot move, so their penalty would be a constant)."""
        model = regularizer.model
        trainable = {canonical_name(n): n for n in regularizer.importance}
        shapes = {canonical_name(n): p.shape for n, p in model.named_parameters()}
        unknown = [n for n in self.importance if canonical_name(n) not in shapes]
        wrong = [
            f"{n}: {tuple(t.shape)} in the file vs {tuple(shapes[canonical_name(n)])}"
            for n, t in self.importance.items()
            if canonical_name(n) in shapes and t.shape != shapes[canonical_name(n)]
        ]
        if unknown or wrong:
            parts = [f"not in the model: {_some(unknown)}" if unknown else ""]
            parts.append(f"shape mismatches: {_some(wrong)}" if wrong else "")
            raise ImportanceFileError(
                f"the importance file (model {self.model.get('class', '?')}) does not fit "
                f"{type(model).__name__}: " + "; ".join(p for p in parts if p) + ". "
                "Compute the file for this model (ewc fisher --model <this model's folder>)."
            )
        frozen = [n for n in self.importance if canonical_name(n) not in trainable]
        used = {trainable[c]: n for n in self.importance if (c := canonical_name(n)) in trainable}
        if not used:
            raise ImportanceFileError(
                f"none of the importance file's {len(self.importance)} parameters is trainable "
                f"in {type(model).__name__} (e.g. {_some(frozen)}), so its penalty could not "
                "change anything: frozen weights never move. With LoRA the trainable weights are "
                "the adapter's: compute the file on the model with its adapter (ewc fisher "
                "--model <adapter folder>), or fine-tune all weights."
            )
        if frozen:
            warnings.warn(
                f"{len(frozen)} of the importance file's {len(self.importance)} parameters are "
                f"frozen in this model and skipped (e.g. {_some(frozen)}): a weight that does "
                "not train cannot be pulled back.",
                stacklevel=2,
            )
        current = regularizer.anchor
        importance = {own: self.importance[n] for own, n in used.items()}
        anchor = {own: self.anchor[used[own]] if own in used else t for own, t in current.items()}
        regularizer.add_task(importance, anchor)


def canonical_name(name: str) -> str:
    """``name`` without the wrappers' prefixes (DDP's ``module.``, PEFT's
    ``base_model.model.``) and PEFT's ``.base_layer`` component, so that a parameter has one
    name inside and outside them."""
    for prefix in _PREFIXES:
        name = name.removeprefix(prefix)
    return name.replace(".base_layer.", ".")


def load_importance(
    directory: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> ImportanceFile:
    """Read a folder written by :meth:`ImportanceFile.save` (tensors onto ``device``), checking
    the JSON's fields and types, that both files come from one save, and that the tensors match
    the recorded names, shapes and dtypes, are finite and (importance) >= 0. Raises
    :class:`ImportanceFileError` naming the file and the field, or ``FileNotFoundError``."""
    from safetensors import SafetensorError, safe_open

    directory = existing_folder(
        directory,
        "importance folder",
        "write one with reg.save_pretrained(folder) or `ewc fisher --out folder`",
    )
    meta = _read_meta(directory / META_FILE)
    path = directory / TENSOR_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist; the folder is incomplete")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            file_id = (f.metadata() or {}).get("file_id")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise ImportanceFileError(f"{str(path)!r} is not a readable safetensors file: {e}") from e
    if file_id != meta["file_id"]:
        raise ImportanceFileError(
            f"{str(path)!r} (file_id {file_id!r}) and {META_FILE} (file_id "
            f"{meta['file_id']!r}) come from different saves; write the folder again"
        )
    importance = {k[11:]: t for k, t in tensors.items() if k.startswith("importance/")}
    anchor = {k[7:]: t for k, t in tensors.items() if k.startswith("anchor/")}
    odd = sorted(k for k in tensors if not k.startswith(("importance/", "anchor/")))
    if odd:
        raise ImportanceFileError(f"{str(path)!r} holds tensors of unknown role: {_some(odd)}")
    recorded = meta["parameters"]
    for what, group in (("importance", importance), ("anchor", anchor)):
        if set(group) != set(recorded):
            raise ImportanceFileError(
                f"{str(path)!r}: the {what} tensors' names differ from {META_FILE} 'parameters' "
                f"(only in the tensors: {_some(sorted(set(group) - set(recorded)))}; only in "
                f"the JSON: {_some(sorted(set(recorded) - set(group)))})"
            )
        for n, t in group.items():
            shape, dtype = recorded[n]["shape"], recorded[n]["dtype"]
            if what == "anchor":  # the dtype recorded is the importance's
                dtype = str(t.dtype).removeprefix("torch.")
            if list(t.shape) != shape or str(t.dtype).removeprefix("torch.") != dtype:
                raise ImportanceFileError(
                    f"{str(path)!r}: {what} tensor {n!r} is {list(t.shape)} {t.dtype}, but "
                    f"{META_FILE} 'parameters' records {shape} {dtype}"
                )
    importance = {n: importance[n] for n in recorded}  # the model's order, as saved
    anchor = {n: anchor[n] for n in recorded}
    fields = {k: meta[k] for k in _FIELDS}
    try:
        return ImportanceFile(importance=importance, anchor=anchor, **fields)
    except ImportanceFileError as e:
        raise ImportanceFileError(f"{str(path)!r}: {e}") from None


#: JSON field -> (allowed types, may be null), besides format/version/file_id/parameters.
_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "strategy": ((str,), False),
    "fisher": ((str,), True),
    "n_samples": ((int,), True),
    "n_tasks": ((int,), False),
    "mode": ((str,), False),
    "gamma": ((int, float), False),
    "data": ((dict,), False),
    "model": ((dict,), False),
    "normalize": ((str,), True),
    "ewc_version": ((str,), False),
    "created": ((str,), False),
}


def _read_meta(path: Path) -> dict[str, Any]:
    """The checked JSON side of an importance folder."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{str(path)!r} does not exist; an importance folder holds {META_FILE} and "
            f"{TENSOR_FILE} (reg.save_pretrained(folder) or `ewc fisher --out folder`)"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ImportanceFileError(f"{str(path)!r} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ImportanceFileError(f"{str(path)!r}: 'format' is {got!r}, not {FORMAT!r}")
    if meta.get("version") != VERSION:
        raise ImportanceFileError(
            f"{str(path)!r}: 'version' {meta.get('version')!r} is not {VERSION}, the one this "
            "ewc reads; upgrade ewc or write the file again"
        )
    for key, (types, nullable) in {**_FIELDS, "file_id": ((str,), False)}.items():
        value = meta.get(key)
        if key not in meta or (value is None and not nullable):
            raise ImportanceFileError(f"{str(path)!r} lacks field {key!r}")
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            names = " or ".join(t.__name__ for t in types)
            raise ImportanceFileError(
                f"{str(path)!r}: field {key!r} must be {names}, got {value!r}"
            )
    if meta["n_samples"] is not None and meta["n_samples"] < 1:
        raise ImportanceFileError(f"{str(path)!r}: field 'n_samples' must be >= 1")
    if meta["n_tasks"] < 1 or not (math.isfinite(meta["gamma"]) and 0 < meta["gamma"] <= 1):
        raise ImportanceFileError(
            f"{str(path)!r}: 'n_tasks' must be >= 1 and 'gamma' in (0, 1]; got "
            f"{meta['n_tasks']!r}, {meta['gamma']!r}"
        )
    params = meta.get("parameters")
    if not isinstance(params, dict) or not params:
        raise ImportanceFileError(f"{str(path)!r}: field 'parameters' must be a non-empty object")
    for n, p in params.items():
        shape = p.get("shape") if isinstance(p, dict) else None
        ok = isinstance(shape, list) and all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape
        )
        if not ok or not isinstance(p.get("dtype"), str):
            raise ImportanceFileError(
                f"{str(path)!r}: 'parameters' entry {n!r} must be "
                f'{{"shape": [ints], "dtype": "float32"}}, got {p!r}'
            )
    return meta


def _check_tensors(
    importance: Mapping[str, Tensor], anchor: Mapping[str, Tensor], what: str
) -> None:
    """Same names and shapes in both, finite, importance >= 0, at least one parameter."""
    if not importance:
        raise ImportanceFileError(f"{what}: no parameters")
    if set(importance) != set(anchor):
        diff = sorted(set(importance) ^ set(anchor))
        raise ImportanceFileError(
            f"{what}: importance and anchor name different parameters: {diff}"
        )
    for n, f in importance.items():
        if f.shape != anchor[n].shape:
            raise ImportanceFileError(
                f"{what}: parameter {n!r} has importance {tuple(f.shape)} but anchor "
                f"{tuple(anchor[n].shape)}"
            )
        for role, t in (("importance", f), ("anchor", anchor[n])):
            if not bool(torch.isfinite(t).all()):
                raise ImportanceFileError(f"{what}: {role} of {n!r} has NaN or Inf values")
        if bool((f < 0).any()):
            raise ImportanceFileError(
                f"{what}: importance of {n!r} is negative (min {float(f.min()):g}); importance "
                "files hold importance >= 0 (SI's path integral can be negative: clamp it at 0)"
            )


def _some(items: list[str], k: int = 5) -> str:
    """The first ``k`` items and how many more."""
    more = f" and {len(items) - k} more" if len(items) > k else ""
    return ", ".join(repr(i) for i in items[:k]) + more
