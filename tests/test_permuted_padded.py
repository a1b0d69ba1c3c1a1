"""scripts/permuted_mnist_padded.py: van de Ven's 32×32 input as 240 zero features appended."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import ewc

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from permuted_mnist_padded import WIDTH, padded


def test_padding_appends_zero_features_and_keeps_the_data() -> None:
    """Every sample becomes 1024 features: its own 784 first, in order, then 240 zeros; labels,
    classes and the task order are unchanged, and a 1024-input MLP trains on the result."""
    g = torch.Generator().manual_seed(0)
    tasks = [
        (
            torch.randint(0, 256, (12, 1, 28, 28), generator=g, dtype=torch.uint8),
            torch.randint(0, 10, (12,), generator=g),
            torch.randint(0, 256, (6, 1, 28, 28), generator=g, dtype=torch.uint8),
            torch.randint(0, 10, (6,), generator=g),
        )
        for _ in range(2)
    ]
    stream = ewc.stream_from_tensors(tasks, scenario="domain")
    out = padded(stream)
    assert out.input_shape == (WIDTH,) and WIDTH == 1024
    for before, after in zip(stream.tasks, out.tasks, strict=True):
        for a, b in ((before.train, after.train), (before.test, after.test)):
            assert b.x.shape == (len(a.x), 1024) and b.x.dtype == torch.uint8
            assert torch.equal(b.x[:, :784], a.x.reshape(len(a.x), -1))
            assert int(b.x[:, 784:].abs().sum()) == 0
            assert torch.equal(b.y, a.y)
        assert after.classes == before.classes and after.name == before.name
    config = ewc.RunConfig(strategy="naive", scenario="domain", iterations=2, batch_size=4)
    result = ewc.run(config, stream=out, model=ewc.MLP(WIDTH, out.n_outputs, hidden=(8,)))
    assert len(result["accuracy_matrix"]) == 2
