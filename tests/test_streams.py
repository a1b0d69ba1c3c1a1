"""Task streams: benchmarks, scenarios, label remapping, seeds, validation splits, user data."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from ewc.data import (
    BENCHMARKS,
    SCENARIOS,
    Task,
    TaskStream,
    TensorPair,
    load_dataset,
    make_stream,
    rotation_angles,
    sources,
    stream_from_tensors,
)
from ewc.data.streams import _build_permuted

OFFLINE = ["split-digits", "permuted-digits", "rotated-digits"]


@pytest.fixture(autouse=True)
def isolated_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("EWC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "_VERIFIED", {})


def val(task: Task) -> TensorPair:
    assert task.val is not None
    return task.val


def check_stream(stream: TaskStream) -> None:
    """Invariants every stream keeps, whatever the benchmark and scenario."""
    assert stream.scenario in SCENARIOS and len(stream) == len(stream.tasks)
    for task in stream:
        assert task.classes == sorted(set(task.classes))
        for pair in (task.train, task.test):
            assert tuple(pair.x.shape[1:]) == stream.input_shape
            assert pair.y.dtype == torch.int64
            assert set(pair.y.unique().tolist()) == set(task.classes)
        assert max(task.classes) < stream.n_outputs


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_split_digits(scenario):
    stream = make_stream("split-digits", scenario)
    check_stream(stream)
    assert stream.task_names == ["0/1", "2/3", "4/5", "6/7", "8/9"]
    assert stream.input_shape == (1, 8, 8) and stream.tasks[0].train.x.dtype == torch.uint8
    if scenario == "domain":
        assert stream.n_outputs == 2 and all(t.classes == [0, 1] for t in stream)
    else:
        assert stream.n_outputs == 10
        assert [t.classes for t in stream] == [[2 * t, 2 * t + 1] for t in range(5)]
    digits = load_dataset("digits", "test")
    assert sum(len(t.test) for t in stream) == len(digits)
    third = stream.tasks[2].test.y  # digits 4/5: parity in domain, the digit otherwise
    expected = digits.y[(digits.y == 4) | (digits.y == 5)]
    assert torch.equal(third, expected - 4 if scenario == "domain" else expected)


@pytest.mark.parametrize("name", ["permuted-digits", "rotated-digits"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_domain_benchmarks(name, scenario):
    stream = make_stream(name, scenario, n_tasks=3)
    check_stream(stream)
    assert len(stream) == 3
    if scenario == "domain":
        assert stream.n_outputs == 10 and all(t.classes == list(range(10)) for t in stream)
    else:
        assert stream.n_outputs == 30
        assert [t.classes for t in stream] == [list(range(10 * t, 10 * t + 10)) for t in range(3)]
    base = load_dataset("digits", "train")
    first = stream.tasks[0].train
    assert torch.equal(first.x, base.x)  # task 1: the untouched data
    for later in stream.tasks[1:]:
        assert not torch.equal(later.train.x, base.x)
        assert torch.equal(later.train.y - later.classes[0], base.y)


def test_permutations():
    stream = make_stream("permuted-digits", n_tasks=4)
    base = torch.cat([load_dataset("digits", split).x for split in ("train", "test")]).flatten(1)
    xs = [torch.cat([t.train.x, t.test.x]).flatten(1) for t in stream]
    assert len({tuple(x[0].tolist()) for x in xs}) == 4  # every task permuted differently
    for x in xs[1:]:  # the columns (pixels over train AND test) are the original ones, moved
        assert sorted(map(tuple, x.T.tolist())) == sorted(map(tuple, base.T.tolist()))


def test_padding_before_permuting_scatters_the_digit_over_the_larger_image():
    """``pad``: every image gets a zero border first (task 1: the digit at the centre), then
    each later task permutes all the padded pixels, so a task's nonzero pixels land anywhere in
    the larger image, and two tasks share fewer input positions than without the padding."""
    base = load_dataset("digits", "train").x
    tasks = _build_permuted("digits", 3, 0, None, False, pad=2)
    first = tasks[0].train.x
    assert first.shape == (len(base), 1, 12, 12)
    assert torch.equal(first[:, :, 2:10, 2:10], base) and int(first.sum()) == int(base.sum())
    for task in tasks[1:]:
        x = task.train.x.flatten(1)
        assert sorted(map(tuple, x.T.tolist())) == sorted(map(tuple, first.flatten(1).T.tolist()))
        assert bool((x[:, :12] > 0).any())  # some digit pixels moved into the old top border

    def shared(raw: list) -> int:
        on = [(t.train.x.flatten(1) > 0).any(0) for t in raw[1:]]
        return int((on[0] & on[1]).sum())

    assert shared(tasks) < shared(_build_permuted("digits", 3, 0, None, False))


def test_seed_reproducibility():
    a = make_stream("permuted-digits", n_tasks=3, seed=5, val_fraction=0.2)
    b = make_stream("permuted-digits", n_tasks=3, seed=5, val_fraction=0.2)
    c = make_stream("permuted-digits", n_tasks=3, seed=6, val_fraction=0.2)
    for ta, tb in zip(a, b, strict=True):
        assert torch.equal(ta.train.x, tb.train.x) and torch.equal(val(ta).x, val(tb).x)
    assert not torch.equal(a.tasks[1].train.x, c.tasks[1].train.x)
    shorter = make_stream("permuted-digits", n_tasks=2, seed=5)
    assert torch.equal(shorter.tasks[1].test.x, a.tasks[1].test.x)  # not tied to n_tasks


def test_rotation_is_counter_clockwise():
    assert rotation_angles(5) == [0, 36, 72, 108, 144]
    stream = make_stream("rotated-digits", n_tasks=2)  # 0 and 90 degrees
    assert stream.task_names == ["rotated-0", "rotated-90"]
    base = load_dataset("digits", "test").x
    assert torch.equal(stream.tasks[1].test.x, torch.rot90(base, 1, dims=(2, 3)))


def test_validation_split_is_disjoint_and_seeded():
    ids = torch.arange(100)
    tasks = [(ids[:, None], ids % 2, ids[:10, None], ids[:10] % 2)] * 2
    stream = stream_from_tensors(tasks, "domain", val_fraction=0.25, seed=3)
    for task in stream:
        train, held = set(task.train.x[:, 0].tolist()), set(val(task).x[:, 0].tolist())
        assert len(held) == 25 and not train & held and train | held == set(range(100))
        assert len(task.test) == 10
    first, second = (set(val(t).x[:, 0].tolist()) for t in stream)
    assert first != second  # each task draws its own split
    again = stream_from_tensors(tasks, "domain", val_fraction=0.25, seed=3)
    assert torch.equal(val(again.tasks[0]).x, val(stream.tasks[0]).x)
    assert stream_from_tensors(tasks, "domain").tasks[0].val is None


def test_make_stream_val_fraction():
    stream = make_stream("split-digits", val_fraction=0.1)
    full = make_stream("split-digits")
    for task, whole in zip(stream, full, strict=True):
        assert len(task.train) + len(val(task)) == len(whole.train)
        assert torch.equal(task.test.x, whole.test.x)
        assert set(val(task).y.tolist()) <= set(task.classes)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(benchmark="split-mnsit"), r"Unknown benchmark 'split-mnsit'.*'split-mnist'"),
        (dict(benchmark="split-digits", scenario="multi"), r"Unknown scenario 'multi'.*'task'"),
        (dict(benchmark="split-digits", n_tasks=6), r"n_tasks must be 1\.\.5, got 6"),
        (dict(benchmark="permuted-digits", n_tasks=0), "n_tasks must be >= 1, got 0"),
        (dict(benchmark="permuted-digits", n_tasks="3"), "n_tasks must be an int, got '3'"),
        (dict(benchmark="split-digits", val_fraction=1.0), r"val_fraction must be in \[0, 1\)"),
    ],
)
def test_make_stream_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_stream(**kwargs)


def test_registry_lists_every_benchmark():
    expected = {"fashion-mnist-to-mnist", "permuted-mnist", "permuted-mnist-32", "rotated-mnist"}
    expected |= {"split-mnist"}
    expected |= {"split-fashion-mnist", *OFFLINE}
    assert expected <= set(BENCHMARKS)
    assert all(b.description for b in BENCHMARKS.values())


# ----------------------------------------------------------------------------- user data


def _tasks(labels_per_task, n=20, d=3):
    g = torch.Generator().manual_seed(0)
    out = []
    for labels in labels_per_task:
        y = torch.tensor(labels).repeat(n // len(labels))
        out.append((torch.randn(len(y), d, generator=g), y, torch.randn(len(y), d), y.clone()))
    return out


def test_stream_from_tensors_remapping():
    overlapping = _tasks([[0, 1, 2], [0, 1, 2]])
    task = stream_from_tensors(overlapping, "task")
    assert task.n_outputs == 6 and [t.classes for t in task] == [[0, 1, 2], [3, 4, 5]]
    assert torch.equal(task.tasks[1].train.y, overlapping[1][1] + 3)
    disjoint = stream_from_tensors(_tasks([[3, 7], [1, 5]]), "class")
    assert disjoint.n_outputs == 8 and [t.classes for t in disjoint] == [[3, 7], [1, 5]]
    domain = stream_from_tensors(_tasks([[3, 7], [1, 5]]), "domain", name="mine")
    assert domain.n_outputs == 2 and domain.name == "mine"
    assert torch.equal(domain.tasks[0].train.y, (_tasks([[3, 7]])[0][1] == 7).long())
    check_stream(domain)
    assert domain.input_shape == (3,) and domain.task_names == ["task-1", "task-2"]


class ListDataset(Dataset):
    """A map-style dataset with per-sample Python access (not a TensorDataset)."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i].numpy(), int(self.y[i])


def test_stream_from_datasets_and_pairs():
    (x, y, tx, ty) = _tasks([[0, 1]])[0]
    stream = stream_from_tensors(
        [
            (TensorDataset(x, y), ListDataset(tx, ty)),
            (TensorPair(x, y), (tx.numpy(), ty.numpy())),
        ],
        "domain",
        task_names=["a", "b"],
    )
    check_stream(stream)
    assert stream.task_names == ["a", "b"]
    assert torch.equal(stream.tasks[0].test.x, tx) and stream.tasks[0].test.y.dtype == torch.int64
    assert torch.equal(stream.tasks[1].test.x, tx)


def test_stream_from_tasks():
    pair = TensorPair(torch.zeros(4, 2), torch.tensor([4, 5, 4, 5]))
    stream = stream_from_tensors([Task("t", pair, pair, [4, 5])], "class", val_fraction=0.5)
    assert stream.n_outputs == 6 and len(val(stream.tasks[0])) == 2
    assert len(stream.tasks[0].train) == 2


ZEROS = torch.zeros(2, 1)
BAD_INPUTS = [
    ([("only one",)], TypeError, r"tasks\[0\]: expected"),
    ([(ZEROS, torch.zeros(2), ZEROS, torch.zeros(2))], TypeError, "Labels must be integers"),
    (_tasks([[0, 1]], d=3) + _tasks([[0, 1]], d=4), ValueError, "one input shape"),
    ([(ZEROS, torch.tensor([0, -1]), ZEROS, torch.tensor([0, 1]))], ValueError, "non-negative"),
    ([], ValueError, "at least one task"),
]


@pytest.mark.parametrize("tasks, error, match", BAD_INPUTS)
def test_stream_from_tensors_errors(tasks, error, match):
    with pytest.raises(error, match=match):
        stream_from_tensors(tasks, "domain")


def test_task_stream_checks_classes():
    pair = TensorPair(torch.zeros(1, 1), torch.tensor([3]))
    with pytest.raises(ValueError, match=r"classes \[3\] outside 0..1"):
        TaskStream("s", "task", [Task("t", pair, pair, [3])], n_outputs=2, input_shape=(1,))


# ----------------------------------------------------------------------------- real data


@pytest.mark.slow
@pytest.mark.parametrize("scenario, n_outputs", [("domain", 10), ("task", 20)])
def test_fashion_mnist_to_mnist(real_data_dir, scenario, n_outputs):
    stream = make_stream("fashion-mnist-to-mnist", scenario, val_fraction=0.1)
    check_stream(stream)
    assert stream.task_names == ["fashion-mnist", "mnist"] and stream.n_outputs == n_outputs
    assert stream.input_shape == (1, 28, 28)
    for task in stream:
        assert (len(task.train), len(val(task)), len(task.test)) == (54000, 6000, 10000)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["split-mnist", "split-fashion-mnist"])
def test_split_real(real_data_dir, name):
    stream = make_stream(name, "task")
    check_stream(stream)
    assert sum(len(t.train) for t in stream) == 60000
    assert sum(len(t.test) for t in stream) == 10000


@pytest.mark.slow
def test_permuted_and_rotated_mnist(real_data_dir):
    mnist = load_dataset("mnist", "test")
    permuted = make_stream("permuted-mnist", n_tasks=3)
    check_stream(permuted)
    assert torch.equal(permuted.tasks[0].test.x, mnist.x)
    assert not torch.equal(permuted.tasks[1].test.x, mnist.x)
    rotated = make_stream("rotated-mnist", "task", n_tasks=2)
    check_stream(rotated)
    assert torch.equal(rotated.tasks[1].test.x, torch.rot90(mnist.x, 1, dims=(2, 3)))
