"""IDX reading, checksums, lookup order, download, datasets and batching (ewc.data)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import urllib.error
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ewc.data import (
    DataIntegrityError,
    DataNotFoundError,
    TensorPair,
    cache_dir,
    download_dataset,
    find_dataset,
    find_datasets,
    iterate_batches,
    load_dataset,
    read_idx,
    sources,
    to_float,
    verify_file,
    write_idx,
)
from ewc.data.sources import DatasetSource, RemoteFile

NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


# ----------------------------------------------------------------------------- toy datasets


@dataclasses.dataclass
class Toy:
    """A fake registered dataset: four small MNIST-style files and their md5 sums."""

    source: DatasetSource
    raw: dict[str, bytes]  # file base name -> uncompressed IDX bytes

    def gz(self, name: str) -> bytes:
        return gzip.compress(self.raw[name], mtime=0)

    def write(self, folder: Path, compress: bool = True) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        for name in self.raw:
            data, suffix = (self.gz(name), ".gz") if compress else (self.raw[name], "")
            (folder / (name + suffix)).write_bytes(data)
        return folder


def _idx_bytes(tensor: torch.Tensor, tmp: Path) -> bytes:
    return write_idx(tmp / "t.idx", tensor, compress=False).read_bytes()


def make_toy(name: str, tmp: Path, seed: int, n: int = 6) -> Toy:
    g = torch.Generator().manual_seed(seed)
    raw = {}
    for split in ("train", "t10k"):
        images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
        raw[f"{split}-images-idx3-ubyte"] = _idx_bytes(images, tmp)
        raw[f"{split}-labels-idx1-ubyte"] = _idx_bytes(labels, tmp)
    files = tuple(
        RemoteFile(
            k, hashlib.md5(gzip.compress(v, mtime=0)).hexdigest(), hashlib.md5(v).hexdigest()
        )
        for k, v in raw.items()
    )
    source = DatasetSource(
        name=name,
        files=files,
        mirrors=(f"https://mirror-a.invalid/{name}/", f"https://mirror-b.invalid/{name}/"),
        subdirs=(name, f"{name.upper()}/raw"),
        system_dirs=(tmp / "system" / name,),
    )
    return Toy(source, raw)


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """A private cache and an empty verification memo for every test."""
    monkeypatch.setenv("EWC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "_VERIFIED", {})


@pytest.fixture
def toy(monkeypatch, tmp_path) -> Toy:
    """Registered fake dataset 'toy' (and 'toy2'); no $EWC_DATA_DIR."""
    monkeypatch.delenv("EWC_DATA_DIR", raising=False)
    monkeypatch.setitem(sources.SOURCES, "toy2", make_toy("toy2", tmp_path, seed=1).source)
    made = make_toy("toy", tmp_path, seed=0)
    monkeypatch.setitem(sources.SOURCES, "toy", made.source)
    return made


class FakeOpener:
    """Serves the toy files by URL; URLs containing a string in ``fail`` are unreachable."""

    def __init__(self, toy: Toy, fail: tuple[str, ...] = (), payload: bytes | None = None):
        self.toy, self.fail, self.payload = toy, fail, payload
        self.calls: list[str] = []

    def __call__(self, url: str) -> io.BytesIO:
        self.calls.append(url)
        if any(f in url for f in self.fail):
            raise urllib.error.URLError("network unreachable")
        name = url.rsplit("/", 1)[1].removesuffix(".gz")
        return io.BytesIO(self.payload if self.payload is not None else self.toy.gz(name))


# ----------------------------------------------------------------------------- IDX


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    dtype=st.sampled_from([torch.uint8, torch.int8, torch.int16, torch.int32, torch.float32]),
    compress=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_idx_round_trip(tmp_path_factory, shape, dtype, compress, seed):
    g = torch.Generator().manual_seed(seed)
    tensor = (torch.randn(shape, generator=g) * 100).to(dtype)
    path = write_idx(tmp_path_factory.mktemp("idx") / "x", tensor, compress=compress)
    out = read_idx(path)
    assert out.dtype == dtype and out.shape == tensor.shape
    assert torch.equal(out, tensor)


def test_compression_detected_by_magic_not_name(tmp_path):
    tensor = torch.arange(12, dtype=torch.uint8).reshape(3, 4)
    gz_named_plain = write_idx(tmp_path / "a.gz", tensor, compress=False)
    plain_named_gz = write_idx(tmp_path / "b", tensor, compress=True)
    assert torch.equal(read_idx(gz_named_plain), tensor)
    assert torch.equal(read_idx(plain_named_gz), tensor)


@pytest.mark.parametrize(
    "mangle, match",
    [
        (lambda b: b[:-3], "payload is 9 bytes.*needs 12.*truncated"),
        (lambda b: b + b"\x00", "payload is 13 bytes"),
        (lambda b: b"\x01" + b[1:], "not an IDX file"),
        (lambda b: b[:2] + b"\x07" + b[3:], "not an IDX file"),
        (lambda b: b[:3] + b"\x09" + b[4:], "declares 9 dimensions"),
        (lambda b: b"", "magic number missing"),
    ],
)
def test_corrupt_idx_is_rejected(tmp_path, mangle, match):
    good = write_idx(tmp_path / "ok", torch.zeros(3, 4, dtype=torch.uint8)).read_bytes()
    bad = tmp_path / "bad-file"
    bad.write_bytes(mangle(good))
    with pytest.raises(DataIntegrityError, match=match) as info:
        read_idx(bad)
    assert str(bad) in str(info.value)


@pytest.mark.parametrize("cut", ["truncate", "crc"])
def test_corrupt_gzip_is_rejected(tmp_path, cut):
    data = gzip.compress(_idx_bytes(torch.ones(50, 7, dtype=torch.uint8), tmp_path))
    data = data[:-10] if cut == "truncate" else data[:-8] + bytes([data[-8] ^ 0xFF]) + data[-7:]
    bad = tmp_path / "bad.gz"
    bad.write_bytes(data)
    with pytest.raises(DataIntegrityError, match="corrupt or truncated gzip") as info:
        read_idx(bad)
    assert str(bad) in str(info.value)


def test_write_idx_rejects_unsupported(tmp_path):
    with pytest.raises(ValueError, match="cannot store"):
        write_idx(tmp_path / "x", torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one dimension"):
        write_idx(tmp_path / "x", torch.tensor(1, dtype=torch.uint8))


# ----------------------------------------------------------------------------- checksums


def test_verify_accepts_gz_recompressed_and_raw(toy, tmp_path):
    name = NAMES[0]
    official = tmp_path / "official.gz"
    official.write_bytes(toy.gz(name))
    recompressed = tmp_path / "debian.gz"  # same content, different gzip wrapping
    recompressed.write_bytes(gzip.compress(toy.raw[name], compresslevel=1, mtime=123))
    plain = tmp_path / "plain"
    plain.write_bytes(toy.raw[name])
    assert recompressed.read_bytes() != official.read_bytes()
    for path in (official, recompressed, plain):
        verify_file(path, "toy", name)


def test_verify_rejects_other_content(toy, tmp_path):
    name = NAMES[0]
    bad = tmp_path / "bad.gz"
    bad.write_bytes(gzip.compress(toy.raw[name][:-1] + b"\x00"))
    file = toy.source.files[0]
    with pytest.raises(DataIntegrityError, match="matches no known file") as info:
        verify_file(bad, "toy", name)
    for needed in (str(bad), file.md5_gz, file.md5_raw, "delete it"):
        assert needed in str(info.value)
    other = tmp_path / "other"
    other.write_bytes(toy.raw[NAMES[1]])
    with pytest.raises(DataIntegrityError, match=f"it is toy/{NAMES[1]}"):
        verify_file(other, "toy", name)


def test_verification_is_remembered_until_the_file_changes(toy, tmp_path, monkeypatch):
    path = tmp_path / "f.gz"
    path.write_bytes(toy.gz(NAMES[0]))
    verify_file(path, "toy", NAMES[0])
    assert list((cache_dir() / "verified").glob("*.json"))
    monkeypatch.setattr(sources, "_VERIFIED", {})  # a new process: only the stamp file is left

    def no_hashing(_path):
        raise AssertionError("re-hashed a verified file")

    monkeypatch.setattr(sources, "_file_md5s", no_hashing)
    verify_file(path, "toy", NAMES[0])
    path.write_bytes(toy.raw[NAMES[0]])  # changed: size differs, the stamp no longer applies
    with pytest.raises(AssertionError, match="re-hashed"):
        verify_file(path, "toy", NAMES[0])


# ----------------------------------------------------------------------------- lookup


def test_lookup_order(toy, tmp_path, monkeypatch):
    places = {
        "arg": toy.write(tmp_path / "arg" / "toy"),
        "env": toy.write(tmp_path / "env" / "toy"),
        "cache": toy.write(cache_dir() / "toy"),
        "system": toy.write(tmp_path / "system" / "toy"),
    }
    monkeypatch.setenv("EWC_DATA_DIR", str(tmp_path / "env"))
    assert find_dataset("toy", tmp_path / "arg", download=False) == places["arg"]
    assert find_dataset("toy", tmp_path / "nowhere", download=False) == places["env"]
    monkeypatch.delenv("EWC_DATA_DIR")
    assert find_dataset("toy", download=False) == places["cache"]
    for path in places["cache"].iterdir():
        path.unlink()
    assert find_dataset("toy", download=False) == places["env"]  # remembered from above
    for path in places["env"].iterdir():
        path.unlink()
    assert find_dataset("toy", download=False) == places["system"]


@pytest.mark.parametrize("how", ["arg", "env"])
def test_data_found_once_is_found_by_every_later_lookup(toy, tmp_path, monkeypatch, how):
    """What ``scripts/demo.sh`` found through ``$EWC_DATA_DIR`` (or a command through
    ``--data-dir``) is found by the next command, which is given neither."""
    folder = toy.write(tmp_path / "shared" / "data" / "toy")
    if how == "env":
        monkeypatch.setenv("EWC_DATA_DIR", str(tmp_path / "shared" / "data"))
    assert find_datasets(["toy"], tmp_path / "shared" / "data" if how == "arg" else None) == {
        "toy": folder
    }
    monkeypatch.delenv("EWC_DATA_DIR", raising=False)
    monkeypatch.setattr(sources, "_VERIFIED", {})  # a new process
    never = FakeOpener(toy, fail=("mirror",))
    assert find_dataset("toy", opener=never) == folder
    assert never.calls == []


@pytest.mark.parametrize("layout", ["toy", "TOY/raw", "."])
@pytest.mark.parametrize("how", ["arg", "env"])
def test_root_or_dataset_folder(toy, tmp_path, monkeypatch, layout, how):
    folder = toy.write(tmp_path / "root" / layout, compress=False)
    if how == "env":
        monkeypatch.setenv("EWC_DATA_DIR", str(tmp_path / "root"))
    found = find_dataset("toy", tmp_path / "root" if how == "arg" else None, download=False)
    assert found == folder
    assert set(sources.dataset_files(found, "toy").values()) == {folder / n for n in NAMES}


def test_folder_of_another_dataset_is_skipped(toy, tmp_path):
    other = make_toy("toy2", tmp_path, seed=1)
    folder = other.write(tmp_path / "only-toy2")
    with pytest.raises(DataNotFoundError, match="holds toy2 files"):
        find_dataset("toy", folder, download=False)


def test_corrupt_file_in_data_dir_raises(toy, tmp_path):
    folder = toy.write(tmp_path / "d")
    (folder / (NAMES[1] + ".gz")).write_bytes(gzip.compress(b"garbage"))
    with pytest.raises(DataIntegrityError, match=NAMES[1]):
        find_dataset("toy", folder, download=False)


def test_not_found_message_lists_places_and_fixes(toy, tmp_path, monkeypatch):
    monkeypatch.setenv("EWC_DATA_DIR", str(tmp_path / "env"))
    toy.write(tmp_path / "partial")
    (tmp_path / "partial" / (NAMES[3] + ".gz")).unlink()
    with pytest.raises(DataNotFoundError) as info:
        find_dataset("toy", tmp_path / "partial", download=False)
    message = str(info.value)
    for needed in (
        str(tmp_path / "partial"),
        f"missing {NAMES[3]}[.gz]",
        str(tmp_path / "env" / "toy"),
        "$EWC_DATA_DIR",
        str(cache_dir() / "toy"),
        str(tmp_path / "system" / "toy"),
        "--data-dir",
        "EWC_DATA_DIR=DIR",
        "download disabled",
        *toy.source.mirrors,
        "split-digits",
    ):
        assert needed in message
    assert max(map(len, message.splitlines())) < 200  # lines a person can read
    assert isinstance(info.value, FileNotFoundError)


def test_missing_datasets_are_all_named_at_once(toy, tmp_path):
    """Two datasets, neither found: one error lists every file of both, not the first alone."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError) as info:
        find_datasets(["toy", "toy2"], tmp_path / "empty", download=False)
    message = str(info.value)
    assert info.value.missing == ("toy", "toy2")
    assert message.startswith("Missing data: toy and toy2")
    for dataset in ("toy", "toy2"):
        assert f"Could not find the {dataset} files ({', '.join(n + '[.gz]' for n in NAMES)})" in (
            message
        )


def test_find_datasets_returns_each_folder(toy, tmp_path):
    folder = toy.write(tmp_path / "d" / "toy")
    assert find_datasets(["toy"], tmp_path / "d", download=False) == {"toy": folder}


def test_unknown_dataset():
    with pytest.raises(ValueError, match=r"Unknown dataset 'mnsit'.*'fashion-mnist', 'mnist'"):
        find_dataset("mnsit")


# ----------------------------------------------------------------------------- download


def test_download_with_fake_opener(toy):
    opener = FakeOpener(toy, fail=("mirror-a",))  # first mirror down, second works
    folder = find_dataset("toy", opener=opener)
    assert folder == cache_dir() / "toy"
    assert sorted(p.name for p in folder.iterdir()) == sorted(n + ".gz" for n in NAMES)
    assert opener.calls[:2] == [m + NAMES[0] + ".gz" for m in toy.source.mirrors]
    assert find_dataset("toy", opener=FakeOpener(toy, fail=("mirror",))) == folder  # cached


def test_download_from_file_url_with_urllib(toy, tmp_path, monkeypatch):
    served = toy.write(tmp_path / "served")
    source = dataclasses.replace(toy.source, mirrors=(served.as_uri() + "/",))
    monkeypatch.setitem(sources.SOURCES, "toy", source)
    assert download_dataset("toy") == cache_dir() / "toy"
    for name in NAMES:
        verify_file(cache_dir() / "toy" / (name + ".gz"), "toy", name)


def test_bad_download_leaves_nothing(toy):
    with pytest.raises(DataNotFoundError) as info:
        find_dataset("toy", opener=FakeOpener(toy, payload=b"not the file"))
    assert "fails its checksum" in str(info.value)
    assert all(m + NAMES[0] + ".gz" in str(info.value) for m in toy.source.mirrors)
    assert list((cache_dir() / "toy").iterdir()) == []


def test_interrupted_download_leaves_nothing(toy):
    class Broken(io.BytesIO):
        def read(self, size=-1):
            if self.tell():
                raise ConnectionResetError("connection reset by peer")
            return super().read(10)

    with pytest.raises(DataNotFoundError, match="connection reset"):
        find_dataset("toy", opener=lambda url: Broken(b"x" * 100))
    assert list((cache_dir() / "toy").iterdir()) == []


def test_offline_message_names_urls(toy):
    with pytest.raises(DataNotFoundError) as info:
        find_dataset("toy", opener=FakeOpener(toy, fail=("mirror",)))
    message = str(info.value)
    assert "network unreachable" in message and "Looked in" in message
    assert str(cache_dir() / "toy") in message


def test_corrupt_cache_file_is_downloaded_again(toy):
    folder = toy.write(cache_dir() / "toy")
    (folder / (NAMES[0] + ".gz")).write_bytes(b"\x1f\x8b broken")
    assert find_dataset("toy", opener=FakeOpener(toy)) == folder
    verify_file(folder / (NAMES[0] + ".gz"), "toy", NAMES[0])


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.delenv("EWC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "ewc"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "ewc"


# ----------------------------------------------------------------------------- datasets


def test_load_from_files(tmp_path, monkeypatch):
    fake = make_toy("mnist", tmp_path, seed=2)
    monkeypatch.setitem(sources.SOURCES, "mnist", fake.source)
    folder = fake.write(tmp_path / "d", compress=False)
    pair = load_dataset("mnist", "test", folder, download=False)
    assert pair.x.shape == (6, 1, 28, 28) and pair.x.dtype == torch.uint8
    assert pair.y.dtype == torch.int64
    assert torch.equal(pair.x[:, 0], read_idx(folder / NAMES[2]))
    assert torch.equal(pair.y, read_idx(folder / NAMES[3]).long())
    assert load_dataset("mnist", "test", folder, download=False) is pair  # cached


def test_load_dataset_errors():
    with pytest.raises(ValueError, match="Unknown dataset 'cifar'"):
        load_dataset("cifar", "train")
    with pytest.raises(ValueError, match=r"Unknown split 'val'.*'train', 'test'"):
        load_dataset("digits", "val")


def test_digits():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert train.x.shape == (1437, 1, 8, 8) and test.x.shape == (360, 1, 8, 8)
    assert train.x.dtype == torch.uint8 and int(train.x.max()) == 255
    assert train.y.dtype == torch.int64
    counts = torch.bincount(test.y)
    assert len(counts) == 10 and 35 <= counts.min() <= counts.max() <= 37  # stratified
    assert torch.equal(train.x, load_dataset("digits", "train").x)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_real_data(real_data_dir, name):
    folder = find_dataset(name, download=False)
    assert folder == real_data_dir / name
    for file, path in sources.dataset_files(folder, name).items():
        verify_file(path, name, file)
    for split, n in (("train", 60000), ("test", 10000)):
        pair = load_dataset(name, split, download=False)
        assert pair.x.shape == (n, 1, 28, 28) and pair.x.dtype == torch.uint8
        assert pair.y.shape == (n,) and pair.y.dtype == torch.int64
        counts = torch.bincount(pair.y).tolist()
        assert len(counts) == 10 and min(counts) > n // 20
        if name == "fashion-mnist":
            assert counts == [n // 10] * 10


def test_real_recompressed_file_passes(real_data_dir, tmp_path):
    """Debian's dataset-fashion-mnist: the same IDX bytes, gzipped again (other gz md5)."""
    official = real_data_dir / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz"
    again = tmp_path / official.name
    again.write_bytes(gzip.compress(gzip.decompress(official.read_bytes()), mtime=1))
    assert hashlib.md5(again.read_bytes()).digest() != hashlib.md5(official.read_bytes()).digest()
    verify_file(again, "fashion-mnist", "t10k-labels-idx1-ubyte")
    with pytest.raises(DataIntegrityError, match="it is fashion-mnist/t10k-labels"):
        verify_file(again, "mnist", "t10k-labels-idx1-ubyte")


# ----------------------------------------------------------------------------- batches


def test_to_float():
    x = torch.tensor([0, 128, 255], dtype=torch.uint8)
    assert torch.allclose(to_float(x), torch.tensor([0.0, 128 / 255, 1.0]))
    assert to_float(torch.tensor([2.0], dtype=torch.float64)).dtype == torch.float64
    assert to_float(torch.tensor([3])).dtype == torch.int64


def test_iterate_batches():
    pair = TensorPair(torch.arange(10, dtype=torch.uint8)[:, None], torch.arange(10))
    batches = list(iterate_batches(pair, 4))
    assert [len(y) for _, y in batches] == [4, 4, 2]
    x, y = batches[0]
    assert x.dtype == torch.float32 and torch.equal(x[:, 0] * 255, y.float())
    assert len(list(iterate_batches(pair, 4, drop_last=True))) == 2

    def order(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.cat([y for _, y in iterate_batches(pair, 3, shuffle=True, generator=g)])

    assert torch.equal(order(0), order(0)) and not torch.equal(order(0), order(1))
    assert sorted(order(0).tolist()) == list(range(10))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        next(iterate_batches(pair, 0))


def test_tensor_pair():
    pair = TensorPair(torch.zeros(3, 2), torch.arange(3))
    x, y = pair
    assert len(pair) == 3 and x is pair.x and y is pair.y
    assert pair.subset(torch.tensor([2])).y.tolist() == [2]
    with pytest.raises(ValueError, match="same N"):
        TensorPair(torch.zeros(3, 2), torch.arange(4))
