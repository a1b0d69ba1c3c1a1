"""Results files: one JSON per run (schema ``ewc.results/1``, see docs/design.md) and CSV summaries.

Every write goes to a temporary file in the destination folder and is renamed into place, so an
interrupted run never leaves a half-written file behind. Under ``torchrun`` only rank 0 writes
(every rank computes the same results; :mod:`ewc.distributed`).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ewc import distributed
from ewc.config import Range
from ewc.metrics import compute_metrics
from ewc.readback import DamagedFileError, mismatch, read_json, short

RESULTS_SCHEMA = "ewc.results/1"
SWEEP_SCHEMA = "ewc.sweep/1"
SUMMARY_FIELDS = ("strategy", "seed", "benchmark", "scenario", "acc", "bwt", "fwt", "forgetting")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary sibling file and an atomic rename.

    The file gets the usual permissions (0666 less the umask), not mkstemp's private 0600.
    In a process group of several processes only rank 0 writes; the others return ``path``.
    """
    path = Path(path)
    if not distributed.is_main_process():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


class OutputError(ValueError):
    """An output path that cannot be written; found before any work is done."""


def check_output(
    path: str | os.PathLike[str],
    *,
    folder: bool = False,
    inputs: Iterable[str | os.PathLike[str]] = (),
) -> Path:
    """Make sure ``path`` (a file, or with ``folder`` a folder) can be written, before the work
    that produces it, without creating anything: a command refused later leaves no trace. Raises
    :class:`OutputError` when ``path`` is a folder (a file is wanted) or a file (a folder is
    wanted), lies under a file, lies in a folder this process may not write (the closest one
    that exists), or is one of ``inputs``. The writes create the folders they need."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise OutputError(f"output folder {str(path)!r} is a file; name a folder")
    if not folder and path.is_dir():
        raise OutputError(f"output file {str(path)!r} is a folder; name a file in it")
    if any(path.resolve() == Path(i).resolve() for i in inputs):
        raise OutputError(f"output {str(path)!r} is also an input; write it somewhere else")
    parent = path if folder else path.parent
    above = next(p for p in (parent, *parent.parents) if p.exists() or p == p.parent)
    if not above.is_dir():
        raise OutputError(f"output {str(path)!r} lies under {str(above)!r}, which is a file")
    if not os.access(above, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write to {str(parent)!r}: {str(above)!r} is not writable")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_results(result: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write one results dict as indented JSON, atomically."""
    return atomic_write_text(path, json.dumps(result, indent=1, allow_nan=False) + "\n")


class ResultsError(DamagedFileError):
    """A results or sweep file that is not one of ours, or is malformed; names the file and key."""


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a results (or sweep) JSON file, checking that it is one of ours and that every key
    the summaries and the report read is there, of the right type, shape and range
    (:func:`check_results`). Raises :class:`ResultsError` (or FileNotFoundError) naming it."""
    data = read_json(path, "results file", ResultsError)
    check_results(data, str(path))
    return data


def check_results(data: Any, source: str = "results") -> None:
    """Check a results (``ewc.results/1``) or sweep (``ewc.sweep/1``) document; raise
    :class:`ResultsError` naming ``source`` and the first bad key."""
    schema = data.get("schema") if isinstance(data, dict) else None
    if schema not in (RESULTS_SCHEMA, SWEEP_SCHEMA):
        raise ResultsError(
            f"{source!r} is not an ewc results file (schema {short(schema)}, expected "
            f"{RESULTS_SCHEMA!r} or {SWEEP_SCHEMA!r})"
        )
    problem = mismatch(data, RESULTS_SPEC if schema == RESULTS_SCHEMA else _SWEEP)
    if problem is None:
        problem = _results_shapes(data) if schema == RESULTS_SCHEMA else _sweep_shapes(data)
    if problem is not None:
        raise ResultsError(f"{source!r} is malformed: {problem}; rerun the experiment")


# The schemas, in the spec language of :func:`ewc.readback.mismatch`.
_NUMBER = Range()
_FRACTION = Range(0, 1)
_CHANGE = (Range(-1, 1), type(None))  # BWT, FWT, forgetting: None for a single task
RESULTS_SPEC: dict[str, Any] = {
    "strategy": str,
    "seed": int,
    "benchmark": str,
    "scenario": str,
    "config": {},
    "task_names": [str],
    "accuracy_matrix": [[_FRACTION]],
    "random_init_accuracy": [_FRACTION],
    "metrics": {"acc": _FRACTION, "bwt": _CHANGE, "fwt": _CHANGE, "forgetting": _CHANGE},
    "curves?": {
        "step": [int],
        "task_boundaries": [int],
        "accuracy": [[_FRACTION]],
        "loss?": [(_NUMBER, type(None))],
        "penalty?": [(_NUMBER, type(None))],
    },
    "importance?": [
        {
            "task": int,
            "layers": {"*": {"log10_edges": [Range(-300, 300)], "counts": [Range(0)]}},
            "input_importance?": {"shape": [Range(1)], "values": [_NUMBER]},
        }
    ],
    "timings?": {"*": _NUMBER},
    "versions?": {"*": str},
    "hardware?": {"*": str},
    "created?": str,
}
_SWEEP: dict[str, Any] = {
    "param?": str,
    "strategy?": str,
    "benchmark?": str,
    "grid?": [_NUMBER],
    "chosen?": _NUMBER,
    "final?": str,
    "points": [
        {
            "value": _NUMBER,
            "error?": str,
            "diverged?": bool,
            "val_acc?": _FRACTION,
            "val_old_acc?": _FRACTION,
            "val_new_acc?": _FRACTION,
        }
    ],
}
_SWEEP_ACCURACIES = ("val_acc", "val_old_acc", "val_new_acc")


def _sweep_shapes(data: dict[str, Any]) -> str | None:
    """Each sweep point either failed (``error``) or has its three validation accuracies; the
    points are the grid's values, in order; the chosen value is the finished point of highest
    validation accuracy."""
    points = data["points"]
    if not points:
        return "'points' is empty"
    for i, point in enumerate(points):
        if "error" not in point and not all(k in point for k in _SWEEP_ACCURACIES):
            return f"'points[{i}]' has neither an error nor {', '.join(_SWEEP_ACCURACIES)}"
        if point.get("diverged") and "error" not in point:
            return f"'points[{i}]' diverged but has no error"
    values = [p["value"] for p in points]
    if "grid" in data and data["grid"] != values:
        return f"'points' are at {short(values)}, not at the 'grid' {short(data['grid'])}"
    if len(set(values)) != len(values):
        return f"'points' holds a value twice ({short(values)})"
    if "chosen" not in data:
        return None
    finished = [p for p in points if "error" not in p]
    best = max((p["val_acc"] for p in finished), default=None)
    chosen = next((p for p in points if p["value"] == data["chosen"]), None)
    if chosen is None:
        return f"'chosen' {short(data['chosen'])} is not one of the points {short(values)}"
    if "error" in chosen or chosen["val_acc"] != best:
        return (
            f"'chosen' {short(data['chosen'])} is not the finished point of highest 'val_acc' "
            f"({short(best)})"
        )
    return None


def _results_shapes(data: dict[str, Any]) -> str | None:
    """The sizes that must agree in a results document: T tasks, a T x T matrix, ..."""
    t = len(data["task_names"])
    rows = data["accuracy_matrix"]
    if t == 0 or len(rows) != t or any(len(row) != t for row in rows):
        return f"'accuracy_matrix' should be {t} x {t} for {t} task names"
    if len(data["random_init_accuracy"]) != t:
        return f"'random_init_accuracy' should hold {t} accuracies"
    problem = _metrics_disagree(data["metrics"], rows, data["random_init_accuracy"])
    if problem is not None:
        return problem
    config = data["config"]
    for key in ("strategy", "seed"):
        if key in config and config[key] != data[key]:
            return f"{key!r} is {short(data[key])} but 'config.{key}' is {short(config[key])}"
    curves = data.get("curves")
    if curves:
        if len(curves["task_boundaries"]) != t:
            return f"'curves.task_boundaries' should hold {t} steps, one per task"
        steps = curves["step"]
        if any(a > b for a, b in itertools.pairwise(steps)):
            return "'curves.step' should never decrease"
        if any(len(a) != t for a in curves["accuracy"]):
            return f"'curves.accuracy' should hold rows of {t} accuracies"
        for key in ("accuracy", "loss", "penalty"):
            if len(curves.get(key, curves["step"])) != len(curves["step"]):
                return f"'curves.{key}' should hold one entry per step"
    for entry in data.get("importance", []):
        image = entry.get("input_importance")
        if not 0 <= entry["task"] < t:
            return f"'importance' names task {entry['task']} of {t}"
        if image and len(image["values"]) != math.prod(image["shape"]):
            return "'importance.input_importance' values do not fill its shape"
        for name, layer in entry["layers"].items():
            if len(layer["counts"]) + 1 != len(layer["log10_edges"]):
                return f"'importance.layers.{name}' should have one edge more than counts"
    return None


#: How far a stored metric may be from the one recomputed from the matrix (float rounding).
_METRIC_TOLERANCE = 1e-9


def _metrics_disagree(
    metrics: dict[str, Any], matrix: list[list[float]], random_init: list[float]
) -> str | None:
    """Which stored metric the accuracy matrix does not give (metrics are never trusted as
    written: they are recomputed), or None."""
    for name, value in compute_metrics(matrix, random_init).items():
        stored = metrics[name]
        if (value is None) != (stored is None) or (
            value is not None and abs(stored - value) > _METRIC_TOLERANCE
        ):
            return (
                f"'metrics.{name}' is {short(stored)} but the accuracy matrix gives "
                f"{short(value)}: the file was edited"
            )
    return None


def stand_in(result: Mapping[str, Any]) -> Mapping[str, str] | None:
    """What a run stood in for and why, ``{"for": benchmark, "reason": ...}``, or None.

    Recorded in its config (``extra["stand_in"]``) by whoever chose the stand-in: the demo runs
    the offline permuted digits when the Fashion-MNIST / MNIST files are missing.
    """
    config = result.get("config")
    extra = config.get("extra") if isinstance(config, Mapping) else None
    note = extra.get("stand_in") if isinstance(extra, Mapping) else None
    return note if isinstance(note, Mapping) else None


#: Config keys that may differ between runs of one experiment: where the data were, the device.
_INCIDENTAL = ("seed", "data_dir", "download", "device", "extra")


def check_comparable(runs: Sequence[Mapping[str, Any]]) -> None:
    """Refuse runs that summaries would wrongly average as seeds of one strategy: two runs of
    a strategy with the same seed, or with configs that differ in more than the seed (and
    :data:`_INCIDENTAL` keys). Raises :class:`ResultsError` naming the strategy and the key."""
    first: dict[str, Mapping[str, Any]] = {}
    seeds: dict[str, list[Any]] = {}
    for run in runs:
        strategy, seed = str(run.get("strategy")), run.get("seed")
        if seed in seeds.setdefault(strategy, []):
            raise ResultsError(
                f"two {strategy} runs with seed {seed}: they would count as two seeds; give "
                "each run once (runs of different settings belong in different reports)"
            )
        seeds[strategy].append(seed)
        config = _essential(run.get("config"))
        other = _essential(first.setdefault(strategy, run).get("config"))
        differ = sorted(k for k in config.keys() | other.keys() if config.get(k) != other.get(k))
        if differ:
            key = differ[0]
            raise ResultsError(
                f"{strategy} runs differ in {key!r} ({short(other.get(key))} and "
                f"{short(config.get(key))}), not only in the seed: they cannot be averaged; "
                "report them separately"
            )


def _essential(config: Any) -> dict[str, Any]:
    """A run's config without the :data:`_INCIDENTAL` keys."""
    if not isinstance(config, Mapping):
        return {}
    return {k: v for k, v in config.items() if k not in _INCIDENTAL}


def summary_rows(results: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per run: strategy, seed, benchmark, scenario and the metrics (fractions)."""
    rows = []
    for r in results:
        row = {k: r.get(k) for k in ("strategy", "seed", "benchmark", "scenario")}
        row.update(r["metrics"])
        rows.append(row)
    return rows


def write_summary_csv(results: Iterable[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write :func:`summary_rows` as CSV, atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(summary_rows(results))
    return atomic_write_text(path, buf.getvalue())
