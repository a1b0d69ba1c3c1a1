"""The outputs of a command, checked together before any work, and held by a lock while it runs.

:func:`check_paths` checks every file and folder a command will write (results, reports,
checkpoints, ``summary.csv``, log folders): no two outputs are the same path, none lies under
an output file, none is an input, and each can be created (:func:`ewc.results.check_output`).
:func:`hold` locks an output (a folder, or a results file) for one command: a second command
writing there refuses with one line naming it and the holder (pid and host); the lock of a
command that died (its pid gone, on this host) is taken over.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from ewc import distributed
from ewc.results import OutputError, check_output

__all__ = ["LOCK_NAME", "check_paths", "hold", "lock_path"]

LOCK_NAME = ".ewc.lock"

Paths = Iterable[str | os.PathLike[str]]


def check_paths(files: Paths, folders: Paths = (), inputs: Paths = ()) -> None:
    """Check that every output file in ``files`` and folder in ``folders`` can be written,
    before any work: first that no two are the same path and none lies under an output file
    (nothing is created until that holds), then each one (:func:`ewc.results.check_output`:
    creatable, a file where a file is wanted, not one of ``inputs``). Raises
    :class:`ewc.results.OutputError` naming the paths."""
    wanted = [(Path(p), False) for p in files] + [(Path(p), True) for p in folders]
    seen: dict[Path, tuple[Path, bool]] = {}
    for path, folder in wanted:
        key = path.resolve()
        if key in seen and (not folder or not seen[key][1]):
            kinds = " and as ".join("a folder" if f else "a file" for f in (seen[key][1], folder))
            raise OutputError(
                f"{str(path)!r} would be written twice, as {kinds}; give each output its own path"
            )
        seen.setdefault(key, (path, folder))
    for key, (path, _) in seen.items():
        above = next((seen[p] for p in key.parents if p in seen and not seen[p][1]), None)
        if above is not None:
            raise OutputError(
                f"output {str(path)!r} lies under {str(above[0])!r}, an output file; give them "
                "different paths"
            )
    for path, folder in sorted(seen.values(), key=lambda item: not item[1]):  # folders first
        check_output(path, folder=folder, inputs=inputs)


def lock_path(output: str | os.PathLike[str]) -> Path:
    """The lock file of ``output``: ``<folder>/.ewc.lock`` for a folder, ``.<name>.lock`` beside
    a file (a name with a suffix, such as ``runs/r.json``)."""
    output = Path(output)
    if output.suffix and not output.is_dir():
        return output.with_name(f".{output.name}.lock")
    return output / LOCK_NAME


@contextmanager
def hold(output: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold the lock of ``output`` (:func:`lock_path`) for the duration of the ``with`` block.

    Raises :class:`ewc.results.OutputError` naming the output and the holder when another
    living process holds it. Under torchrun rank 0 holds it for every rank."""
    path = lock_path(output)
    # Under torchrun the process group may not be set up yet: RANK says which process this is.
    if not distributed.is_main_process() or os.environ.get("RANK", "0") != "0":
        yield path
        return
    _acquire(path, Path(output))
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _acquire(path: Path, output: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    me = {"pid": os.getpid(), "host": host, "command": " ".join(sys.argv)}
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        for _ in range(2):
            try:
                os.link(tmp, path)  # atomic, and fails if the lock exists
                return
            except FileExistsError:
                holder = _holder(path)
                if holder is not None and _alive(holder, host):
                    raise OutputError(
                        f"{str(output)!r} is being written by another ewc command (pid "
                        f"{holder.get('pid')} on {holder.get('host')}: "
                        f"{str(holder.get('command', ''))[:80]!r}); wait for it to end or choose "
                        f"another output. If that command is gone, delete {str(path)!r}"
                    ) from None
                path.unlink(missing_ok=True)  # a dead command's lock: taken over
        raise OutputError(f"cannot take the lock {str(path)!r}; another command keeps taking it")
    finally:
        Path(tmp).unlink(missing_ok=True)


def _holder(path: Path) -> dict[str, object] | None:
    """Who holds the lock at ``path``, or None for an unreadable or damaged lock file."""
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _alive(holder: dict[str, object], host: str) -> bool:
    """Whether the process holding a lock may still run: always when it is on another host
    (this one cannot tell), else when its pid exists."""
    pid = holder.get("pid")
    if holder.get("host") != host:
        return True
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
