"""In-memory datasets as uint8 tensors: MNIST, Fashion-MNIST and scikit-learn's digits.

A dataset split is a :class:`TensorPair` ``(x, y)``: ``x`` uint8 ``[N, 1, H, W]`` with pixel
values 0..255, ``y`` int64 ``[N]``. Batches are index gathers converted to float in [0, 1]
by :func:`to_float` (see :func:`iterate_batches`); there is no per-sample Python and no
DataLoader.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ewc._optional import require
from ewc.data.idx import parse_idx
from ewc.data.sources import dataset_files, find_dataset, verified_content

__all__ = [
    "DATASETS",
    "SPLITS",
    "TensorPair",
    "iterate_batches",
    "load_dataset",
    "to_float",
]

DATASETS = ("mnist", "fashion-mnist", "digits")
SPLITS = ("train", "test")
_IDX_PREFIX = {"train": "train", "test": "t10k"}

DIGITS_TEST_SIZE = 360
"""scikit-learn digits: 1797 images, split 1437 train / 360 test, stratified, seed 0."""


@dataclass(frozen=True)
class TensorPair:
    """Inputs and integer labels of one split: ``x`` ``[N, ...]``, ``y`` int64 ``[N]``.

    Unpacks as ``x, y = pair``; ``len(pair)`` is ``N``. Treat the tensors as read-only: loads
    are cached and shared.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.y.dim() != 1 or self.x.shape[0] != self.y.shape[0]:
            raise ValueError(
                f"TensorPair needs x [N, ...] and y [N] with the same N; got x "
                f"{tuple(self.x.shape)} and y {tuple(self.y.shape)}."
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.x, self.y))

    def subset(self, index: torch.Tensor) -> TensorPair:
        """The samples at ``index`` (int64 indices or a bool mask ``[N]``)."""
        return TensorPair(self.x[index], self.y[index])


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels 0..255 -> float32 in [0, 1]; any other tensor is returned as it is (a float64
    model's inputs stay float64, token ids stay integers)."""
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    return x


def iterate_batches(
    pair: TensorPair,
    batch_size: int,
    *,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x_float [B, ...] float32 in [0, 1], y [B] int64)`` batches by index gather.

    ``shuffle`` draws a permutation from ``generator`` (a CPU generator; seed it for
    reproducible order). Batches are gathered where ``pair`` lives, then moved to ``device``
    as uint8 (4x less traffic than float) and converted there.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    n = len(pair)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    order = order.to(pair.x.device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        index = order[start : start + batch_size]
        x, y = pair.x[index], pair.y[index]
        yield to_float(x.to(device)), y.to(device)


def load_dataset(
    name: str,
    split: str,
    data_dir: str | Path | None = None,
    download: bool = True,
) -> TensorPair:
    """Load one split of a dataset as uint8 images ``[N, 1, H, W]`` and int64 labels ``[N]``.

    - ``"mnist"``, ``"fashion-mnist"``: 28x28, 60000 train / 10000 test, found or downloaded
      by :func:`ewc.data.sources.find_dataset` (``data_dir``, ``download`` as there).
    - ``"digits"``: scikit-learn's 8x8 digits (ships with scikit-learn, no network), values
      0..16 scaled to 0..255, split 1437 train / 360 test stratified with seed 0.

    Results are cached in process: a repeated load returns the same tensors.
    """
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; choose one of {list(DATASETS)}.")
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; choose one of {list(SPLITS)}.")
    if name == "digits":
        return _load_digits()[SPLITS.index(split)]
    files = dataset_files(find_dataset(name, data_dir, download), name)
    images = files[f"{_IDX_PREFIX[split]}-images-idx3-ubyte"]
    labels = files[f"{_IDX_PREFIX[split]}-labels-idx1-ubyte"]
    return _read_pair(
        name, split, str(images), str(labels), _file_version(images), _file_version(labels)
    )


def _file_version(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=8)
def _read_pair(
    dataset: str,
    split: str,
    images: str,
    labels: str,
    images_version: tuple[int, int],
    labels_version: tuple[int, int],
) -> TensorPair:
    """Read and verify an images/labels IDX pair; the versions key the cache on file changes."""
    x = _read_verified(images, dataset, f"{_IDX_PREFIX[split]}-images-idx3-ubyte")
    y = _read_verified(labels, dataset, f"{_IDX_PREFIX[split]}-labels-idx1-ubyte")
    if x.dim() != 3 or x.dtype != torch.uint8 or y.dim() != 1:
        raise ValueError(
            f"{images}, {labels}: expected uint8 images [N, H, W] and labels [N], got "
            f"{x.dtype} {tuple(x.shape)} and {y.dtype} {tuple(y.shape)}."
        )
    return TensorPair(x.unsqueeze(1), y.to(torch.int64))


def _read_verified(path: str, dataset: str, name: str) -> torch.Tensor:
    """The tensor in IDX file ``path``, from bytes verified to be ``dataset``'s file ``name``."""
    return parse_idx(verified_content(Path(path).read_bytes(), path, dataset, name), path)


@functools.lru_cache(maxsize=1)
def _load_digits() -> tuple[TensorPair, TensorPair]:
    load_digits = require("sklearn.datasets", "digits").load_digits
    train_test_split = require("sklearn.model_selection", "digits").train_test_split

    bunch = load_digits()
    x = torch.from_numpy(bunch.images).mul(255.0 / 16.0).round().to(torch.uint8).unsqueeze(1)
    y = torch.from_numpy(bunch.target).to(torch.int64)
    train, test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=DIGITS_TEST_SIZE, stratify=y.numpy(), random_state=0
    )
    return (
        TensorPair(x[torch.from_numpy(train)], y[torch.from_numpy(train)]),
        TensorPair(x[torch.from_numpy(test)], y[torch.from_numpy(test)]),
    )
