"""A corrupt data file is never used: IDX bytes fuzzed, and a file rewritten behind the stamp."""

from __future__ import annotations

import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ewc.data import datasets
from ewc.data.datasets import load_dataset
from ewc.data.idx import DataIntegrityError, parse_idx
from ewc.data.sources import verified_content


@st.composite
def _idx_like(draw: st.DrawFn) -> bytes:
    """Bytes that start like an IDX file (any dtype code, up to 4 dimensions) with a payload
    of any length: the cases a parser gets wrong."""
    code = draw(st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x00, 0xFF]))
    dims = draw(st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 6), max_size=4))
    header = bytes([0, 0, code, len(dims)]) + np.asarray(dims, dtype=">u4").tobytes()
    return header + draw(st.binary(max_size=64))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.binary(max_size=64) | _idx_like())
def test_any_bytes_parse_to_a_tensor_or_data_integrity_error(data):
    try:
        tensor = parse_idx(data)
    except DataIntegrityError:
        return
    assert tensor.numel() * tensor.element_size() == len(data) - 4 - 4 * data[3]


@settings(max_examples=100, deadline=None, derandomize=True)
@given(st.binary(max_size=64) | _idx_like(), st.booleans())
def test_no_bytes_but_the_known_ones_are_verified(data, compress):
    data = gzip.compress(data) if compress else data
    with pytest.raises(DataIntegrityError, match=r"^x: "):
        verified_content(data, "x", "mnist", "t10k-labels-idx1-ubyte")


def test_labels_rewritten_with_mtime_restored_are_refused(real_data_dir, tmp_path, monkeypatch):
    """An uncompressed label file, verified once (and stamped), then rewritten with its mtime
    set back: the next load (a new process: no in-memory cache) refuses it."""
    monkeypatch.setenv("EWC_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "mnist"
    folder.mkdir()
    for gz in (real_data_dir / "mnist").glob("*.gz"):
        shutil.copy(gz, folder / gz.name)
    labels = folder / "t10k-labels-idx1-ubyte"
    labels.write_bytes(gzip.decompress((folder / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    assert len(load_dataset("mnist", "test", data_dir=folder, download=False)) == 10000

    stat = labels.stat()
    data = bytearray(labels.read_bytes())
    data[-1] = (data[-1] + 1) % 10  # one label changed, same size
    labels.write_bytes(bytes(data))
    os.utime(labels, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert labels.stat().st_mtime_ns == stat.st_mtime_ns
    datasets._read_pair.cache_clear()
    with pytest.raises(DataIntegrityError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", "test", data_dir=Path(folder), download=False)
