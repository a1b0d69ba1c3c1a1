"""Data: IDX files, dataset lookup/download/verification, in-memory datasets, task streams."""

from ewc.data.datasets import TensorPair, iterate_batches, load_dataset, to_float
from ewc.data.idx import DataIntegrityError, read_idx, write_idx
from ewc.data.sources import (
    DataNotFoundError,
    cache_dir,
    download_dataset,
    find_dataset,
    find_datasets,
    verify_file,
)
from ewc.data.streams import (
    BENCHMARKS,
    SCENARIOS,
    Task,
    TaskStream,
    make_stream,
    rotation_angles,
    stream_from_tensors,
)

__all__ = [
    "BENCHMARKS",
    "SCENARIOS",
    "DataIntegrityError",
    "DataNotFoundError",
    "Task",
    "TaskStream",
    "TensorPair",
    "cache_dir",
    "download_dataset",
    "find_dataset",
    "find_datasets",
    "iterate_batches",
    "load_dataset",
    "make_stream",
    "read_idx",
    "rotation_angles",
    "stream_from_tensors",
    "to_float",
    "verify_file",
    "write_idx",
]
