"""``state_dtype``: the importance and anchor stored in a lower precision, arithmetic in the
parameters' dtype."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ewc
from ewc.regularizers import L2, MAS, SI, OnlineEWC


def model_and_data() -> tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    return model, [(torch.randn(32, 8), torch.randint(0, 3, (32,)))]


def moved(model: nn.Module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))


def test_bfloat16_state_halves_the_bytes_and_keeps_the_penalty_close() -> None:
    model, data = model_and_data()
    low = ewc.EWC(model, lam=10.0, state_dtype=torch.bfloat16)
    exact = ewc.EWC(model, lam=10.0)
    for reg in (low, exact):
        reg.consolidate(data)
    moved(model)
    assert {t.dtype for t in [*low.importance.values(), *low.anchor.values()]} == {torch.bfloat16}
    size = sum(t.nbytes for t in low.importance.values())
    assert 2 * size == sum(t.nbytes for t in exact.importance.values())
    penalty = low.penalty()
    assert penalty.dtype == torch.float32
    torch.testing.assert_close(penalty, exact.penalty(), rtol=2e-2, atol=0)
    assert float(penalty.detach()) != float(exact.penalty().detach())  # rounding is there


@pytest.mark.parametrize("path", ["add_penalty_grad", "proximal_step"])
def test_bfloat16_state_updates_float32_parameters(path: str) -> None:
    model, data = model_and_data()
    low = ewc.EWC(model, lam=10.0, state_dtype=torch.bfloat16)
    twin = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    twin.load_state_dict(model.state_dict())
    exact = ewc.EWC(twin, lam=10.0)
    low.consolidate(data)
    exact.consolidate(data)
    moved(model)
    moved(twin)
    for reg in (low, exact):
        if path == "add_penalty_grad":
            reg.add_penalty_grad()
        else:
            reg.proximal_step(0.1)
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        got, want = (p.grad, q.grad) if path == "add_penalty_grad" else (p, q)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=5e-2, atol=1e-4)


@pytest.mark.parametrize("cls", [OnlineEWC, MAS, SI, L2])
def test_every_quadratic_regularizer_takes_state_dtype(cls: type) -> None:
    model, data = model_and_data()
    reg = cls(model, lam=1.0, state_dtype=torch.bfloat16)
    reg.consolidate(data)
    assert next(iter(reg.importance.values())).dtype == torch.bfloat16
    assert reg.penalty().dtype == torch.float32


def test_state_dict_round_trip_and_model_moves_keep_the_state_dtype() -> None:
    model, data = model_and_data()
    reg = ewc.EWC(model, lam=10.0, state_dtype=torch.bfloat16)
    reg.consolidate(data)
    model.double()
    moved(model)
    assert reg.penalty().dtype == torch.float64
    assert next(iter(reg.anchor.values())).dtype == torch.bfloat16
    again = ewc.EWC(model, lam=1.0, state_dtype=torch.bfloat16)
    again.load_state_dict(reg.state_dict())
    assert float(again.penalty()) == float(reg.penalty())


@pytest.mark.parametrize("bad", ["bfloat16", torch.int8, 16])
def test_a_bad_state_dtype_is_named(bad: object) -> None:
    with pytest.raises(ValueError, match=r"state_dtype must be a floating torch\.dtype"):
        ewc.EWC(nn.Linear(2, 2), lam=1.0, state_dtype=bad)  # type: ignore[arg-type]
