"""The device contract, run on the CPU here and on a GPU wherever one is (the ``cuda`` group).

Models live on the device, batches come from CPU ``DataLoader``s as users' do, and results must
match a float64 CPU reference. ``pytest -m cuda`` runs the GPU half alone.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from test_devices import REGULARIZERS
from test_fisher import CASES, PER_SAMPLE_KINDS, _setup
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ewc

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(autouse=True)
def _full_precision_matmuls() -> Iterator[None]:
    """TF32 would round GPU matmuls to 10 mantissa bits: compare against float32 proper."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", PER_SAMPLE_KINDS)
@pytest.mark.parametrize("name", list(CASES))
def test_fisher_of_a_model_on_the_device_from_cpu_batches(
    name: str, kind: str, device: str
) -> None:
    """Every layer rule (and the fallbacks) on the device, fed CPU batches, against the float64
    per-sample loop on the CPU."""
    case = CASES[name]
    model, batches = _setup(case)
    common = {"kind": kind, "likelihood": case.likelihood, "forward": case.forward}
    reference = ewc.fisher_diagonal(model, batches, method="loop", **common)
    model = model.float().to(device)
    floats = [
        tuple(t.float() if t.is_floating_point() else t for t in b)
        if isinstance(b, tuple)
        else {k: t.float() if t.is_floating_point() else t for k, t in b.items()}
        for b in batches
    ]
    actual = ewc.fisher_diagonal(model, floats, **common)
    for param_name, f in reference.items():
        assert actual[param_name].device.type == device
        torch.testing.assert_close(
            actual[param_name].double().cpu(), f, rtol=2e-3, atol=1e-6 * float(f.abs().max())
        )


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 4, (32,), generator=g))
    return DataLoader(data, batch_size=8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(REGULARIZERS))
def test_regularizer_built_before_the_model_moves(name: str, device: str) -> None:
    """Build on the CPU, move the model, train, consolidate from a CPU DataLoader; the state is on
    the device, and a state_dict saved there loads into a CPU model with the same values."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    reg = REGULARIZERS[name](model)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for task in range(2):
        for x, y in _loader():
            loss = nn.functional.cross_entropy(model(x.to(device)), y.to(device))
            loss = loss + reg.penalty()
            opt.zero_grad()
            loss.backward()
            reg.add_penalty_grad()
            opt.step()
            reg.after_step()
        reg.consolidate(_loader())
        assert reg.n_tasks == task + 1
    assert all(t.device.type == device for t in reg.importance.values())
    assert reg.penalty().device.type == device
    cpu_model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    cpu_model.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    restored = REGULARIZERS[name](cpu_model)
    restored.load_state_dict(reg.state_dict())
    for param_name, f in reg.importance.items():
        assert restored.importance[param_name].device.type == "cpu"
        torch.testing.assert_close(restored.importance[param_name], f.cpu())
    torch.testing.assert_close(restored.penalty(), reg.penalty().cpu(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_penalty_grad_under_autocast_and_grad_scaler(device: str) -> None:
    """Mixed precision: ``add_penalty_grad`` between ``scaler.unscale_`` and ``scaler.step``
    gives the float32 step (bfloat16 autocast on a CPU, float16 with loss scaling on a GPU)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)).to(device)
    reg = ewc.EWC(model, lam=100.0)
    reg.consolidate(_loader())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = (t.to(device) for t in next(iter(_loader())))

    def step(mixed: bool) -> dict[str, torch.Tensor]:
        model.load_state_dict(start)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        dtype = torch.float16 if device == "cuda" else torch.bfloat16
        scaler = torch.amp.GradScaler(device, enabled=mixed and device == "cuda")
        with torch.autocast(device, dtype=dtype, enabled=mixed):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # first: the penalty's gradient must not be scaled
        reg.add_penalty_grad()
        scaler.step(opt)
        scaler.update()
        return {k: v.clone() for k, v in model.state_dict().items()}

    exact, mixed = step(False), step(True)
    for name in exact:
        moved = (exact[name] - start[name]).abs().max()
        torch.testing.assert_close(mixed[name], exact[name], rtol=0, atol=0.05 * float(moved))


@pytest.mark.cuda
def test_run_on_the_gpu() -> None:
    pytest.importorskip("sklearn")
    config = ewc.RunConfig(
        benchmark="split-digits", strategy="ewc", device="cuda", epochs=2.0, seed=0
    )
    result = ewc.run(config)
    assert result["config"]["device"] == "cuda"
    assert min(result["accuracy_matrix"][-1]) > 0.6  # every task learned and kept (chance: 0.5)
