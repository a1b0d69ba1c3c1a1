"""Reading and writing IDX files, the format of MNIST and Fashion-MNIST.

An IDX file is a 4-byte magic number ``0x00 0x00 <dtype code> <ndim>``, then ``ndim``
big-endian uint32 dimensions, then the payload in C order, big-endian. The files are
usually gzip-compressed; :func:`read_idx` tells the two apart by their first bytes, never
by the file name.
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
import torch

__all__ = ["DataIntegrityError", "read_idx", "write_idx"]

GZIP_MAGIC = b"\x1f\x8b"

# IDX dtype code -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_TORCH_TO_CODE: dict[torch.dtype, int] = {
    torch.uint8: 0x08,
    torch.int8: 0x09,
    torch.int16: 0x0B,
    torch.int32: 0x0C,
    torch.float32: 0x0D,
    torch.float64: 0x0E,
}


class DataIntegrityError(ValueError):
    """A data file is corrupt, truncated, in the wrong format or fails its checksum."""


def read_idx(path: str | Path) -> torch.Tensor:
    """Read an IDX file, gzip-compressed or not.

    Parameters
    ----------
    path : file to read. Compression is detected from the gzip magic bytes.

    Returns
    -------
    Tensor with the file's shape and dtype (MNIST: uint8 images ``[N, 28, 28]``, uint8
    labels ``[N]``).

    Raises
    ------
    DataIntegrityError : bad gzip stream (CRC, truncation), bad magic number, or a payload
        whose size does not match the header's dimensions. The message names the file.
    """
    path = Path(path)
    return parse_idx(decompress_if_gzip(path.read_bytes(), path), path)


def decompress_if_gzip(data: bytes, path: str | Path) -> bytes:
    """Return ``data`` decompressed if it starts with the gzip magic, else unchanged.

    Raises :class:`DataIntegrityError` naming ``path`` when the gzip stream is corrupt.
    """
    if not data.startswith(GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataIntegrityError(
            f"{path}: corrupt or truncated gzip stream ({exc}). Delete the file and download "
            "it again."
        ) from exc


def parse_idx(data: bytes, path: str | Path = "<bytes>") -> torch.Tensor:
    """Parse uncompressed IDX bytes into a tensor; ``path`` is only used in error messages."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataIntegrityError(
            f"{path}: not an IDX file (magic number {data[:4].hex() or 'missing'}; expected "
            f"00 00 <dtype code in {sorted(_IDX_DTYPES)}> <ndim>)."
        )
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataIntegrityError(
            f"{path}: IDX header declares {ndim} dimensions but the file has {len(data)} bytes."
        )
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = math.prod(shape) * dtype.itemsize
    if len(data) - header != expected:
        raise DataIntegrityError(
            f"{path}: IDX payload is {len(data) - header} bytes but the header's shape {shape} "
            f"needs {expected}; the file is truncated or corrupt. Delete it and download it again."
        )
    try:
        array = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=header)
        array = array.reshape(shape)
    except ValueError as exc:  # e.g. an empty payload declared as (0, 2**31, 2**31)
        raise DataIntegrityError(f"{path}: impossible IDX shape {shape} ({exc}).") from exc
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def write_idx(path: str | Path, tensor: torch.Tensor, compress: bool | None = None) -> Path:
    """Write ``tensor`` as an IDX file; gzip it when ``compress`` (default: name ends in .gz).

    Supported dtypes: uint8, int8, int16, int32, float32, float64; at least one dimension.
    """
    path = Path(path)
    if tensor.dtype not in _TORCH_TO_CODE or tensor.dim() == 0:
        raise ValueError(
            f"write_idx: cannot store a {tensor.dim()}-d {tensor.dtype} tensor; IDX needs at "
            f"least one dimension and one of {sorted(map(str, _TORCH_TO_CODE))}."
        )
    code = _TORCH_TO_CODE[tensor.dtype]
    header = bytes([0, 0, code, tensor.dim()]) + np.asarray(tensor.shape, dtype=">u4").tobytes()
    payload = tensor.detach().cpu().contiguous().numpy().astype(_IDX_DTYPES[code]).tobytes()
    data = header + payload
    if compress if compress is not None else path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)
    return path
