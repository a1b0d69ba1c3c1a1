"""Finding, downloading and verifying the MNIST and Fashion-MNIST files.

Where :func:`find_dataset` looks, in order (the first folder holding all four files wins):

1. the ``data_dir`` argument (the CLI's ``--data-dir``),
2. the ``EWC_DATA_DIR`` environment variable,
3. the user cache, :func:`cache_dir` ``/<name>`` (where downloads go),
4. the folder where the files were found before through 1 or 2, remembered in the cache
   (``cache_dir()/found/<name>``), so that data one command was pointed at (``scripts/demo.sh``
   points at ``../shared/data``) is where every later command looks,
5. system folders: Debian's ``dataset-fashion-mnist`` package installs
   ``/usr/share/datasets/fashion-mnist/*.gz`` (layout read from the package's file list,
   version 0.0~git20200523.55506a9-1),
6. a download from the official mirrors into the user cache (``download=True``).

A root from 1 or 2 may be the dataset folder itself or a folder holding it as ``<name>/``
(``mnist/``, ``fashion-mnist/``) or in torchvision's layout (``MNIST/raw/``,
``FashionMNIST/raw/``). Files may be gzip-compressed (``train-images-idx3-ubyte.gz``) or not
(``train-images-idx3-ubyte``).

Every file is checked against embedded md5 sums: the md5 of the official gz file OR the md5
of its decompressed content (Debian recompresses the same IDX bytes, so its gz md5 differs).
Anything else is rejected. To find folders fast, a verified file is remembered by path, size,
mtime and ctime (which no one can set back), in process and in a small stamp file under
``cache_dir()/verified/``; the bytes a load parses are hashed again every time
(:func:`verified_content`), so a file changed in any way since is never used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ewc.data.idx import GZIP_MAGIC, DataIntegrityError, decompress_if_gzip

__all__ = [
    "SOURCES",
    "DataNotFoundError",
    "DatasetSource",
    "RemoteFile",
    "cache_dir",
    "dataset_files",
    "download_dataset",
    "find_dataset",
    "find_datasets",
    "verified_content",
    "verify_file",
]

Opener = Callable[[str], Any]
"""``opener(url)`` returns a binary file-like context manager (``urllib.request.urlopen``)."""

DOWNLOAD_TIMEOUT_S = 30.0
_CHUNK = 1 << 20


class DataNotFoundError(FileNotFoundError):
    """The data files are nowhere to be found and could not be downloaded.

    ``missing`` names the datasets not found (``("fashion-mnist", "mnist")``), when known.
    """

    def __init__(self, message: str, missing: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.missing = missing


@dataclass(frozen=True)
class RemoteFile:
    """One IDX file: base name (without ``.gz``) and its two accepted md5 sums."""

    name: str
    md5_gz: str  # md5 of the official .gz file
    md5_raw: str  # md5 of the decompressed IDX bytes


@dataclass(frozen=True)
class DatasetSource:
    """Where a dataset's files come from and what they must hash to."""

    name: str
    files: tuple[RemoteFile, ...]
    mirrors: tuple[str, ...]  # base URLs; a file is fetched from mirror + name + ".gz"
    subdirs: tuple[str, ...] = ()  # folders under a data root that may hold the files
    system_dirs: tuple[Path, ...] = ()  # read-only system installs (Debian packages)


SOURCES: dict[str, DatasetSource] = {
    "mnist": DatasetSource(
        name="mnist",
        files=(
            RemoteFile(
                "train-images-idx3-ubyte",
                "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                "6bbc9ace898e44ae57da46a324031adb",
            ),
            RemoteFile(
                "train-labels-idx1-ubyte",
                "d53e105ee54ea40749a09fcbcd1e9432",
                "a25bea736e30d166cdddb491f175f624",
            ),
            RemoteFile(
                "t10k-images-idx3-ubyte",
                "9fb629c4189551a2d022fa330f9573f3",
                "2646ac647ad5339dbf082846283269ea",
            ),
            RemoteFile(
                "t10k-labels-idx1-ubyte",
                "ec29112dd5afa0611ce80d1b7f02629c",
                "27ae3e4e09519cfbb04c329615203637",
            ),
        ),
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        subdirs=("mnist", "MNIST/raw"),
    ),
    "fashion-mnist": DatasetSource(
        name="fashion-mnist",
        files=(
            RemoteFile(
                "train-images-idx3-ubyte",
                "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            ),
            RemoteFile(
                "train-labels-idx1-ubyte",
                "25c81989df183df01b3e8a0aad5dffbe",
                "9018921c3c673c538a1fc5bad174d6f9",
            ),
            RemoteFile(
                "t10k-images-idx3-ubyte",
                "bef4ecab320f06d8554ea6380940ec79",
                "8181f5470baa50b63fa0f6fddb340f0a",
            ),
            RemoteFile(
                "t10k-labels-idx1-ubyte",
                "bb300cfdad3c16e7a12a480ee83cd310",
                "15d484375f8d13e6eb1aabb0c3f46965",
            ),
        ),
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        subdirs=("fashion-mnist", "FashionMNIST/raw"),
        system_dirs=(Path("/usr/share/datasets/fashion-mnist"),),
    ),
}

# (resolved path, size, mtime_ns, ctime_ns) -> md5 that identified the file as a known one.
_VERIFIED: dict[tuple[str, int, int, int], str] = {}


def cache_dir() -> Path:
    """The user cache: ``$EWC_CACHE_DIR``, else ``$XDG_CACHE_HOME/ewc``, else ``~/.cache/ewc``."""
    if os.environ.get("EWC_CACHE_DIR"):
        return Path(os.environ["EWC_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "ewc"


def _source(name: str) -> DatasetSource:
    if name not in SOURCES:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {sorted(SOURCES)}.")
    return SOURCES[name]


def _known_md5s() -> dict[str, tuple[str, str]]:
    """md5 (gz or decompressed) -> (dataset, file base name), over every known dataset."""
    table: dict[str, tuple[str, str]] = {}
    for source in SOURCES.values():
        for file in source.files:
            table[file.md5_gz] = table[file.md5_raw] = (source.name, file.name)
    return table


# ----------------------------------------------------------------------------- verification


def _stamp_key(path: Path) -> tuple[str, int, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def _stamp_path(key: tuple[str, int, int, int]) -> Path:
    return cache_dir() / "verified" / (hashlib.sha1(key[0].encode()).hexdigest() + ".json")


def _remember(path: Path, md5: str) -> None:
    """Record that ``path`` (as it is now) hashes to the known ``md5``."""
    key = _stamp_key(path)
    _VERIFIED[key] = md5
    stamp = _stamp_path(key)
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        tmp = stamp.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": list(key), "md5": md5}))
        os.replace(tmp, stamp)
    except OSError:  # a read-only cache only costs a re-hash next time
        pass


def _recall(path: Path) -> str | None:
    """The md5 remembered for ``path`` if it has not changed since, else None."""
    key = _stamp_key(path)
    if key in _VERIFIED:
        return _VERIFIED[key]
    try:
        stamp = json.loads(_stamp_path(key).read_text())
    except (OSError, ValueError):
        return None
    if stamp.get("key") != list(key):
        return None
    _VERIFIED[key] = stamp["md5"]
    return str(stamp["md5"])


def _file_md5s(path: Path) -> Iterator[str]:
    """md5 of the file's bytes, then (lazily, for gz files) of its decompressed content."""
    data = path.read_bytes()
    yield hashlib.md5(data).hexdigest()
    if data.startswith(GZIP_MAGIC):
        yield hashlib.md5(decompress_if_gzip(data, path)).hexdigest()


def _identify(path: Path) -> tuple[str, str] | None:
    """Which known (dataset, file) ``path`` is, by md5 of the gz or of the content."""
    table = _known_md5s()
    remembered = _recall(path)
    if remembered in table:
        return table[remembered]
    for md5 in _file_md5s(path):
        if md5 in table:
            _remember(path, md5)
            return table[md5]
    return None


def verify_file(path: str | Path, dataset: str, name: str) -> None:
    """Check that ``path`` is file ``name`` of ``dataset`` by md5 (gz or decompressed content).

    Raises
    ------
    DataIntegrityError : the file hashes to something else (corrupt, truncated, another file).
    """
    path = Path(path)
    if name not in {f.name for f in _source(dataset).files}:
        raise ValueError(f"{dataset!r} has no file {name!r}.")
    found = _identify(path)
    if found != (dataset, name):
        raise _mismatch(path, dataset, name, found)


def verified_content(data: bytes, path: str | Path, dataset: str, name: str) -> bytes:
    """The IDX bytes in ``data`` (read from ``path``; decompressed if gzip), once their md5 (of
    ``data``, or of the decompressed content) shows they are file ``name`` of ``dataset``.

    One md5 pass over the bytes a load parses anyway: ~0.02 s for MNIST's training images
    gz, ~0.09 s uncompressed. Raises :class:`DataIntegrityError` naming ``path`` otherwise.
    """
    file = next((f for f in _source(dataset).files if f.name == name), None)
    if file is None:
        raise ValueError(f"{dataset!r} has no file {name!r}.")
    md5 = hashlib.md5(data).hexdigest()
    content = decompress_if_gzip(data, path)
    if md5 in (file.md5_gz, file.md5_raw):
        return content
    content_md5 = hashlib.md5(content).hexdigest() if content is not data else md5
    if content_md5 == file.md5_raw:
        return content
    table = _known_md5s()
    raise _mismatch(Path(path), dataset, name, table.get(md5) or table.get(content_md5))


def _mismatch(
    path: Path, dataset: str, name: str, found: tuple[str, str] | None
) -> DataIntegrityError:
    file = next(f for f in _source(dataset).files if f.name == name)
    what = f"it is {found[0]}/{found[1]}" if found else "it matches no known file"
    return DataIntegrityError(
        f"{path}: checksum mismatch for {dataset}/{name} ({what}). Expected md5 {file.md5_gz} "
        f"(official .gz) or {file.md5_raw} (decompressed content). The file is corrupt, "
        "truncated or not the right one: delete it to download it again, or point --data-dir "
        "/ EWC_DATA_DIR at good copies."
    )


# ----------------------------------------------------------------------------- lookup


def _file_in(folder: Path, name: str) -> Path | None:
    """``folder/name.gz`` or ``folder/name``, whichever exists (gz first)."""
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def dataset_files(folder: str | Path, dataset: str) -> dict[str, Path]:
    """Map each file base name of ``dataset`` to its path in ``folder`` (gz or raw).

    Raises DataNotFoundError when a file is missing. Does not verify checksums.
    """
    folder, source = Path(folder), _source(dataset)
    paths = {f.name: _file_in(folder, f.name) for f in source.files}
    missing = [name for name, path in paths.items() if path is None]
    if missing:
        raise DataNotFoundError(f"{folder}: missing {', '.join(n + '[.gz]' for n in missing)}.")
    return {name: path for name, path in paths.items() if path is not None}


def _check_folder(folder: Path, source: DatasetSource) -> str | None:
    """None if ``folder`` holds all of ``source``'s files, verified; else why not.

    Raises DataIntegrityError when a file there is corrupt (matches no known file).
    """
    if not folder.is_dir():
        return "no such folder"
    if not any(_file_in(folder, f.name) for f in source.files):
        return "none of the files"
    try:
        files = dataset_files(folder, source.name)
    except DataNotFoundError as exc:
        return str(exc).removeprefix(f"{folder}: ").rstrip(".")
    for name, path in files.items():
        found = _identify(path)
        if found is not None and found[0] != source.name:
            return f"holds {found[0]} files, not {source.name}"
        if found != (source.name, name):
            raise _mismatch(path, source.name, name, found)
    return None


def _found_note(name: str) -> Path:
    """The file in the cache that remembers where dataset ``name`` was last found."""
    return cache_dir() / "found" / name


def _remember_folder(name: str, folder: Path) -> None:
    """Remember ``folder`` as where dataset ``name`` lies, for later lookups without it."""
    note = _found_note(name)
    try:
        note.parent.mkdir(parents=True, exist_ok=True)
        tmp = note.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(str(folder.resolve()) + "\n")
        os.replace(tmp, note)
    except OSError:  # a read-only cache only means passing the folder again next time
        pass


def _remembered_folder(name: str) -> Path | None:
    """The folder remembered by :func:`_remember_folder`, if any."""
    try:
        return Path(_found_note(name).read_text().strip())
    except OSError:
        return None


_GIVEN = ("data_dir / --data-dir", "$EWC_DATA_DIR")
"""How the folders given by the user are labelled in :func:`_candidates`."""


def _candidates(source: DatasetSource, data_dir: str | Path | None) -> list[tuple[Path, str]]:
    """Folders to look in, in order, each with a note on where it came from."""
    roots = zip((data_dir, os.environ.get("EWC_DATA_DIR")), _GIVEN, strict=True)
    out: list[tuple[Path, str]] = []
    for root, how in roots:
        if root:
            base = Path(root).expanduser()
            out += [(base / sub, how) for sub in source.subdirs] + [(base, how)]
    out.append((cache_dir() / source.name, "user cache"))
    remembered = _remembered_folder(source.name)
    if remembered is not None:
        out.append((remembered, f"found there before, remembered in {_found_note(source.name)}"))
    out += [(folder, "system install") for folder in source.system_dirs]
    return out


def find_dataset(
    name: str,
    data_dir: str | Path | None = None,
    download: bool = True,
    *,
    opener: Opener | None = None,
) -> Path:
    """Return the folder holding the verified files of dataset ``name``.

    Looks where the module docstring says, then downloads into the user cache when
    ``download``. ``opener`` replaces ``urllib.request.urlopen`` (tests, proxies). A folder
    found through ``data_dir`` or ``$EWC_DATA_DIR`` is remembered for later lookups.

    Raises
    ------
    ValueError : unknown ``name``.
    DataIntegrityError : a file in an explicit folder is corrupt.
    DataNotFoundError : the files are nowhere and the download is off or failed; the message
        lists every place looked, how to supply the files and the offline benchmarks.
    """
    return find_datasets((name,), data_dir, download, opener=opener)[name]


def find_datasets(
    names: Sequence[str],
    data_dir: str | Path | None = None,
    download: bool = True,
    *,
    opener: Opener | None = None,
) -> dict[str, Path]:
    """:func:`find_dataset` for each of ``names``; the folder of each, by name.

    Raises
    ------
    DataNotFoundError : one error for every dataset not found, each with its files and the
        places looked, so that all that is missing is known at once; ``missing`` names them.
    """
    found: dict[str, Path] = {}
    sections: list[str] = []
    for name in names:
        where = _lookup(_source(name), data_dir, download, opener)
        if isinstance(where, Path):
            found[name] = where
        else:
            sections.append(where)
    missing = tuple(name for name in names if name not in found)
    if missing:
        header = [f"Missing data: {' and '.join(missing)} (all listed below)."]
        message = [*header[: len(missing) > 1], *sections, *_how_to_supply(missing)]
        raise DataNotFoundError("\n".join(message), missing=missing)
    return found


def _lookup(
    source: DatasetSource, data_dir: str | Path | None, download: bool, opener: Opener | None
) -> Path | str:
    """The folder holding ``source``'s verified files, else what was tried, as lines of text."""
    looked: list[str] = []
    for folder, how in _candidates(source, data_dir):
        try:
            why_not = _check_folder(folder, source)
        except DataIntegrityError as exc:
            if folder != cache_dir() / source.name or not download:  # only our cache is repaired
                raise
            why_not = f"{exc} (re-downloading)"
        if why_not is None:
            if how in _GIVEN:
                _remember_folder(source.name, folder)
            return folder
        looked.append(f"  - {folder} ({how}): {why_not}")
    failures = "download disabled (download=False / --no-download)"
    if download:
        try:
            return download_dataset(source.name, opener=opener)
        except DataNotFoundError as exc:
            failures = str(exc)
    names = ", ".join(f.name + "[.gz]" for f in source.files)
    unset = ["  ($EWC_DATA_DIR is not set)"] if not os.environ.get("EWC_DATA_DIR") else []
    return "\n".join(
        [
            f"Could not find the {source.name} files ({names}).",
            "Looked in:",
            *looked,
            *unset,
            f"Download: {failures}",
        ]
    )


def _how_to_supply(names: Sequence[str]) -> list[str]:
    """Lines on how to supply the files of datasets ``names``, and the offline alternative."""
    sources = [_source(name) for name in names]
    folders = " and ".join(f"{s.name}/" for s in sources)
    return [
        "To supply the files:",
        *(f"  - get the {s.name} files from {' or '.join(s.mirrors)}" for s in sources),
        f"  - then put them in {cache_dir()}/{folders}, or pass --data-dir DIR "
        "(Python: data_dir=DIR) or set EWC_DATA_DIR=DIR,",
        f"    where DIR holds {folders} (or one data set's files); gzip-compressed or plain.",
        "No data at hand? The benchmarks split-digits and permuted-digits run offline "
        "(scikit-learn's digits, pip install 'ewc[digits]').",
    ]


# ----------------------------------------------------------------------------- download


def _default_opener(url: str) -> Any:
    return urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S)


def download_dataset(
    name: str, dest: str | Path | None = None, *, opener: Opener | None = None
) -> Path:
    """Download the files of dataset ``name`` missing or bad in ``dest`` (default: the cache).

    Each file is fetched into a temporary file next to its destination, md5-verified, then
    renamed into place, so a failed or interrupted download never leaves a partial file.
    Mirrors are tried in order.

    Returns ``dest``. Raises DataNotFoundError listing each URL tried and its error.
    """
    source = _source(name)
    dest = Path(dest) if dest is not None else cache_dir() / name
    errors: list[str] = []
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataNotFoundError(f"cannot create {dest}: {exc}") from exc
    for file in source.files:
        existing = _file_in(dest, file.name)
        if existing is not None:
            with contextlib.suppress(DataIntegrityError):
                if _identify(existing) == (name, file.name):
                    continue
            existing.unlink()  # a bad copy: replace it
        for mirror in source.mirrors:
            url = mirror + file.name + ".gz"
            try:
                _fetch(url, dest / (file.name + ".gz"), name, file, opener or _default_opener)
                break
            except (OSError, DataIntegrityError) as exc:
                errors.append(f"{url}: {exc}")
        else:
            raise DataNotFoundError("failed:\n" + "\n".join(f"    {e}" for e in errors))
    return dest


def _fetch(url: str, target: Path, dataset: str, file: RemoteFile, opener: Opener) -> None:
    """Stream ``url`` into ``target`` atomically, verifying it is ``dataset``/``file``."""
    try:
        from tqdm.auto import tqdm  # optional ([cli]): the download works without its bar
    except ImportError:
        tqdm = None

    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, opener(url) as response:
            headers = getattr(response, "headers", None)
            total = int(headers.get("Content-Length") or 0) if headers is not None else 0
            bar = (
                None
                if tqdm is None
                else tqdm(
                    total=total or None, unit="B", unit_scale=True, desc=file.name, disable=None
                )
            )  # a tqdm bar without a total has no truth value: compare with None
            with contextlib.nullcontext() if bar is None else bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
        md5 = next((m for m in _file_md5s(tmp) if m in (file.md5_gz, file.md5_raw)), None)
        if md5 is None:
            raise DataIntegrityError(
                f"downloaded data fails its checksum (expected md5 {file.md5_gz} or content "
                f"md5 {file.md5_raw} for {dataset}/{file.name})"
            )
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _remember(target, md5)
