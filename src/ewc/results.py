"""Results files: one JSON per run (schema ``ewc.results/1``, see docs/design.md) and CSV summaries.

Every write goes to a temporary file in the destination folder and is renamed into place, so an
interrupted run never leaves a half-written file behind.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

RESULTS_SCHEMA = "ewc.results/1"
SWEEP_SCHEMA = "ewc.sweep/1"
SUMMARY_FIELDS = ("strategy", "seed", "benchmark", "scenario", "acc", "bwt", "fwt", "forgetting")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary sibling file and an atomic rename.

    The file gets the usual permissions (0666 less the umask), not mkstemp's private 0600.
    """
    path = Path(path)
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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_results(result: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write one results dict as indented JSON, atomically."""
    return atomic_write_text(path, json.dumps(result, indent=1, allow_nan=False) + "\n")


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a results (or sweep) JSON file, checking that it is one of ours."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"results file {str(path)!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}); rerun the experiment") from None
    schema = data.get("schema") if isinstance(data, dict) else None
    if schema not in (RESULTS_SCHEMA, SWEEP_SCHEMA):
        raise ValueError(
            f"{str(path)!r} is not an ewc results file (schema {schema!r}, expected "
            f"{RESULTS_SCHEMA!r} or {SWEEP_SCHEMA!r})"
        )
    return data


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
