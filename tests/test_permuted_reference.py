"""scripts/permuted_mnist_reference.py: van de Ven's naive protocol in plain PyTorch."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from permuted_mnist_reference import batches, mlp, permutations, permuted, prepare, train_naive


def test_permutations_follow_the_authors_schedule() -> None:
    """Seed 0 leaves the first task unpermuted, other seeds permute every task; each order is a
    permutation of the 1024 pixels, and a seed always gives the same orders."""
    zero, one = permutations(0, 3), permutations(1, 3)
    assert zero[0] is None and all(o is not None for o in one)
    for order in [*zero[1:], *one]:
        assert order is not None and torch.equal(order.sort().values, torch.arange(1024))
    again = permutations(1, 3)
    assert all(torch.equal(a, b) for a, b in zip(one, again, strict=True) if a is not None)
    assert not torch.equal(one[1], one[2])  # type: ignore[arg-type]


def test_prepare_pads_to_32x32_in_unit_range() -> None:
    """Each 28×28 uint8 image becomes 1024 floats: its pixels / 255 at the centre, 2-pixel zero
    border around it."""
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    x = prepare(images).reshape(3, 32, 32)
    assert torch.equal(x[:, 2:30, 2:30], images[:, 0].float() / 255)
    border = x.clone()
    border[:, 2:30, 2:30] = 0
    assert int(border.count_nonzero()) == 0


def test_batches_drop_the_last_partial_batch_and_reshuffle_each_epoch() -> None:
    """n full batches, drawn epoch after epoch: an epoch of 10 samples in batches of 4 gives two
    batches of distinct samples, and the 5 batches asked for span three epochs."""
    x, y = torch.arange(10).float()[:, None], torch.arange(10)
    out = [yb for _, yb in batches(x, y, batch_size=4, n=5)]
    assert [len(b) for b in out] == [4] * 5
    for epoch in (out[0:2], out[2:4]):
        assert len(set(torch.cat(epoch).tolist())) == 8


def test_train_naive_learns_a_task_and_fills_the_accuracy_matrix() -> None:
    """Row t holds the accuracy on tasks 1..t+1 after task t+1; a linearly separable task is
    learned (over 90 %) and its permuted copy too."""
    torch.manual_seed(0)
    x = torch.rand(512, 1024)
    y = (x[:, :512].sum(1) > x[:, 512:].sum(1)).long()
    orders = [None, torch.randperm(1024)]
    matrix = train_naive(
        (x, y), (x, y), orders, mlp(hidden=32, n_classes=2), iterations=300, batch_size=64, lr=1e-2
    )
    assert [len(row) for row in matrix] == [1, 2]
    assert matrix[0][0] > 90 and matrix[1][1] > 90
    assert torch.equal(permuted(x, orders[1])[:, orders[1].argsort()], x)
