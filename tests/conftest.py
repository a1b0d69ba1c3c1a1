"""Shared fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def real_data_dir() -> Path:
    """The folder with the real ``mnist/`` and ``fashion-mnist/`` files, from ``$EWC_DATA_DIR``.

    Skips the test when it is not set or has no such subfolders (CI sets it to
    ``../shared/data``).
    """
    value = os.environ.get("EWC_DATA_DIR")
    if not value or not all((Path(value) / name).is_dir() for name in ("mnist", "fashion-mnist")):
        pytest.skip(
            "real MNIST/Fashion-MNIST files not available: set EWC_DATA_DIR to a folder with "
            "mnist/ and fashion-mnist/ subfolders"
        )
    return Path(value)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tests use small models, for which one thread is fastest and immune to a busy machine."""
    import torch

    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the ``cuda`` group where no GPU is visible (it runs wherever one is)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
