"""Importance files: save_pretrained / load_importance / from_pretrained round trips, the checks
that name the file and field, and matching a file to a model by name (wrappers, frozen weights)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import ewc
from ewc.importance_file import (
    LAMBDA_CONVENTION,
    META_FILE,
    TENSOR_FILE,
    ImportanceFile,
    ImportanceFileError,
    canonical_name,
)


def net(seed: int = 0, hidden: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, hidden), nn.Tanh(), nn.Linear(hidden, 3))


def batches(seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g))]


@pytest.fixture
def saved(tmp_path: Path) -> tuple[ewc.EWC, Path]:
    reg = ewc.EWC(net(), lam=10.0, fisher="exact")
    reg.consolidate(batches())
    folder = reg.save_pretrained(tmp_path / "fisher", data={"name": "toy"}, n_samples=16)
    return reg, folder


def test_save_then_load_round_trips_tensors_and_metadata(saved: tuple[ewc.EWC, Path]) -> None:
    reg, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == [META_FILE, TENSOR_FILE]  # no temp files
    file = ewc.load_importance(folder)
    for name, f in reg.importance.items():
        assert torch.equal(file.importance[name], f)
        assert torch.equal(file.anchor[name], reg.anchor[name])
    assert (file.strategy, file.fisher, file.n_samples, file.n_tasks) == ("ewc", "exact", 16, 1)
    assert (file.mode, file.gamma, file.data, file.model) == (
        "separate",
        1.0,
        {"name": "toy"},
        {"class": "Sequential"},
    )
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["lambda_convention"] == LAMBDA_CONVENTION
    assert meta["normalize"] is None and meta["ewc_version"] == ewc.__version__
    assert meta["parameters"]["0.weight"] == {"shape": [5, 4], "dtype": "float32"}
    assert not (folder / TENSOR_FILE).read_bytes().startswith(b"\x80")  # not a pickle


def test_from_pretrained_gives_the_saved_penalty(saved: tuple[ewc.EWC, Path]) -> None:
    reg, folder = saved
    model = net()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    again = ewc.EWC.from_pretrained(model, folder, lam=10.0)
    assert again.n_tasks == 1
    reference = ewc.EWC(model, lam=10.0)
    reference.add_task(reg.importance, reg.anchor)
    assert float(again.penalty().detach()) > 0
    assert torch.allclose(again.penalty(), reference.penalty())


def test_online_ewc_file_records_mode_and_tasks(tmp_path: Path) -> None:
    reg = ewc.OnlineEWC(net(), lam=1.0, gamma=0.5)
    reg.consolidate(batches(1))
    reg.consolidate(batches(2))
    file = ewc.load_importance(reg.save_pretrained(tmp_path / "f"))
    assert (file.strategy, file.mode, file.gamma, file.n_tasks, file.n_samples) == (
        "online-ewc",
        "online",
        0.5,
        2,
        None,
    )


def test_save_before_consolidate_and_negative_importance_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="consolidated no task"):
        ewc.EWC(net(), lam=1.0).save_pretrained(tmp_path / "f")
    reg = ewc.L2(net(), lam=1.0)
    reg.consolidate()
    with pytest.raises(ValueError, match="n_samples must be"):
        reg.save_pretrained(tmp_path / "f", n_samples=0)
    reg.importance["0.weight"][0, 0] = -1.0
    with pytest.raises(ImportanceFileError, match=r"importance of '0\.weight' is negative"):
        reg.save_pretrained(tmp_path / "f")
    assert not (tmp_path / "f").exists()


def _edit_meta(folder: Path, **changes: object) -> None:
    meta = json.loads((folder / META_FILE).read_text())
    meta.update(changes)
    (folder / META_FILE).write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"format": "other"}, "'format' is 'other'"),
        ({"version": 9}, "'version' 9"),
        ({"n_samples": "many"}, "field 'n_samples' must be int"),
        ({"fisher": 3}, "field 'fisher' must be str"),
        ({"strategy": None}, "lacks field 'strategy'"),
        ({"gamma": 2.0}, "'gamma' in"),
        ({"parameters": {}}, "'parameters' must be a non-empty object"),
        ({"parameters": {"0.weight": {"shape": "5x4"}}}, "'parameters' entry '0.weight'"),
        ({"file_id": "0"}, "come from different saves"),
    ],
)
def test_a_bad_json_field_is_named(
    saved: tuple[ewc.EWC, Path], changes: dict[str, object], message: str
) -> None:
    _, folder = saved
    _edit_meta(folder, **changes)
    with pytest.raises(ImportanceFileError, match=message) as info:
        ewc.load_importance(folder)
    assert str(folder) in str(info.value)


def test_tensors_that_disagree_with_the_json_are_named(saved: tuple[ewc.EWC, Path]) -> None:
    _, folder = saved
    path = folder / TENSOR_FILE
    original = path.read_bytes()
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    cases = {
        "importance tensor '2.bias' is \\[4\\]": ("importance/2.bias", torch.ones(4)),
        "importance of '2.bias' has NaN": ("importance/2.bias", torch.full((3,), float("nan"))),
        "importance of '2.bias' is negative": ("importance/2.bias", -torch.ones(3)),
        "anchor of '2.bias' has NaN or Inf": ("anchor/2.bias", torch.full((3,), float("inf"))),
    }
    for message, (key, value) in cases.items():
        tensors = load_file(io_path := str(path))
        tensors[key] = value
        save_file(tensors, io_path, metadata=metadata)
        with pytest.raises(ImportanceFileError, match=message):
            ewc.load_importance(folder)
        path.write_bytes(original)
    tensors = load_file(str(path))
    del tensors["anchor/2.bias"]
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ImportanceFileError, match="anchor tensors' names differ"):
        ewc.load_importance(folder)


def test_missing_or_unreadable_files_are_named(saved: tuple[ewc.EWC, Path], tmp_path: Path) -> None:
    _, folder = saved
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ewc.load_importance(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="is a file, not a folder"):
        ewc.load_importance(folder / META_FILE)
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / TENSOR_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ImportanceFileError, match="not a readable safetensors"):
        ewc.load_importance(broken)
    (broken / META_FILE).write_text("{")
    with pytest.raises(ImportanceFileError, match="not valid JSON"):
        ewc.load_importance(broken)
    (broken / TENSOR_FILE).unlink()
    shutil.copy(folder / META_FILE, broken / META_FILE)
    with pytest.raises(FileNotFoundError, match="incomplete"):
        ewc.load_importance(broken)


def test_a_file_for_another_model_is_refused_by_name(saved: tuple[ewc.EWC, Path]) -> None:
    _, folder = saved
    with pytest.raises(
        ImportanceFileError,
        match=r"shape mismatches: .*'0.weight: \(5, 4\) in the file vs \(6, 4\)'",
    ):
        ewc.EWC.from_pretrained(net(hidden=6), folder, lam=1.0)
    other = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.Linear(3, 3))
    other = nn.Sequential(*list(other)[:1], nn.Identity(), *list(other)[1:])  # names shift
    with pytest.raises(ImportanceFileError, match=r"not in the model: '2\.weight', '2\.bias'"):
        ewc.EWC.from_pretrained(other, folder, lam=1.0)


class Wrapped(nn.Module):
    """Names as a PEFT model gives them: ``base_model.model.`` + the inner names, and a LoRA
    layer's own weight under ``.base_layer``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.base_model = nn.Module()
        self.base_model.model = inner
        layer = inner[0]
        inner[0] = nn.Module()
        inner[0].base_layer = layer


def test_names_match_through_peft_prefixes_and_frozen_entries_are_skipped(
    saved: tuple[ewc.EWC, Path],
) -> None:
    reg, folder = saved
    model = Wrapped(net())
    assert canonical_name("base_model.model.0.base_layer.weight") == "0.weight"
    started = ewc.EWC.from_pretrained(model, folder, lam=1.0)
    assert torch.equal(
        started.importance["base_model.model.0.base_layer.weight"], reg.importance["0.weight"]
    )
    for p in model.base_model.model[0].parameters():
        p.requires_grad_(False)  # as LoRA freezes the layer it wraps
    with pytest.warns(UserWarning, match="2 of the importance file's 4 parameters are frozen"):
        started = ewc.EWC.from_pretrained(model, folder, lam=1.0)
    assert torch.equal(started.importance["base_model.model.2.weight"], reg.importance["2.weight"])
    for p in model.parameters():
        p.requires_grad_(False)
    model.extra = nn.Linear(1, 1)  # the only trainable parameter: none of the file's
    with pytest.raises(ImportanceFileError, match="none of the importance file's 4 parameters"):
        ewc.EWC.from_pretrained(model, folder, lam=1.0)


def test_a_file_built_in_memory_is_checked() -> None:
    with pytest.raises(ImportanceFileError, match="name different parameters"):
        ImportanceFile({"w": torch.ones(2)}, {"v": torch.ones(2)}, strategy="ewc")
    with pytest.raises(ImportanceFileError, match="no parameters"):
        ImportanceFile({}, {}, strategy="ewc")
