"""Device and dtype follow the model; half-precision Fisher sums; robust batches; safe loading.

The CUDA side of the same contract is in tests/test_cuda.py (skipped without a GPU); here a
change of dtype (``model.double()``) stands in for a change of device: both go through
``Module.to``, which keeps the ``Parameter`` objects and swaps their data.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ewc
from ewc.fisher import FisherError
from ewc.regularizers import QuadraticRegularizer


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def data(n: int = 24, dtype: torch.dtype = torch.float32) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g, dtype=dtype)
    return TensorDataset(x, torch.randint(0, 3, (n,), generator=g))


REGULARIZERS: dict[str, Callable[[nn.Module], QuadraticRegularizer]] = {
    "ewc": lambda m: ewc.EWC(m, lam=10.0),
    "online-ewc": lambda m: ewc.OnlineEWC(m, lam=10.0, gamma=0.9),
    "si": lambda m: ewc.SI(m, lam=10.0),
    "mas": lambda m: ewc.MAS(m, lam=10.0),
    "l2": lambda m: ewc.L2(m, lam=10.0),
}


def train_steps(model: nn.Module, reg: QuadraticRegularizer, loader: DataLoader) -> None:
    """A few SGD steps with every penalty path: autograd, closed form, proximal."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    dtype = next(model.parameters()).dtype
    for x, y in loader:
        loss = nn.functional.cross_entropy(model(x.to(dtype)), y) + reg.penalty()
        opt.zero_grad()
        loss.backward()
        reg.add_penalty_grad()
        opt.step()
        reg.proximal_step(0.01)
        reg.after_step()


@pytest.mark.parametrize("name", list(REGULARIZERS))
def test_state_follows_the_model_when_it_moves_after_the_regularizer_is_built(name: str) -> None:
    model = mlp()
    reg = REGULARIZERS[name](model)
    loader = DataLoader(data(), batch_size=8)
    train_steps(model, reg, loader)
    reg.consolidate(loader)
    model.double()  # after consolidation: the state must follow
    train_steps(model, reg, DataLoader(data(dtype=torch.float64), batch_size=8))
    tensors = [*reg.importance.values(), *reg.anchor.values()]
    assert all(t.dtype == torch.float64 for t in tensors)
    assert reg.penalty().dtype == torch.float64
    reg.consolidate(DataLoader(data(dtype=torch.float64), batch_size=8))
    assert reg.n_tasks == 2


def test_penalty_after_a_move_equals_the_penalty_before() -> None:
    model = mlp()
    reg = ewc.EWC(model, lam=3.0)
    reg.consolidate(DataLoader(data(), batch_size=8))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    before = reg.penalty().item()
    model.double()
    assert reg.penalty().item() == pytest.approx(before, rel=1e-6)


def test_load_state_dict_maps_onto_the_models_dtype() -> None:
    source = ewc.EWC(mlp().double(), lam=2.0)
    source.consolidate(DataLoader(data(dtype=torch.float64), batch_size=8))
    target = ewc.EWC(mlp(), lam=1.0)
    target.load_state_dict(source.state_dict())
    assert all(t.dtype == torch.float32 for t in target.importance.values())
    for name, f in source.importance.items():
        torch.testing.assert_close(target.importance[name], f.float())


def test_half_precision_fisher_sums_in_float32() -> None:
    """1000 one-sample batches: bfloat16 sums (8-bit mantissa) would stall far below the total;
    float32 sums keep the bf16 model's Fisher within bf16 rounding of the float32 model's."""
    model = mlp()
    x, y = data(1000).tensors
    reference = ewc.fisher_diagonal(model, [(x, y)])
    singles = [(x[i : i + 1].bfloat16(), y[i : i + 1]) for i in range(1000)]
    half = ewc.fisher_diagonal(model.bfloat16(), singles)
    for name, f in reference.items():
        assert half[name].dtype == torch.bfloat16
        error = (half[name].float() - f).abs().max() / f.abs().max()
        assert error < 0.03, (name, float(error))


def test_empty_batches_are_skipped() -> None:
    model = mlp()
    x, y = data().tensors
    with_empty = [(x[:0], y[:0]), (x[:10], y[:10]), (x[10:10], y[10:10]), (x[10:], y[10:])]
    expected = ewc.fisher_diagonal(model, [(x, y)])
    actual = ewc.fisher_diagonal(model, with_empty)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name])


@pytest.mark.parametrize("kind", ["exact", "sampled", "empirical", "batched"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_inputs_raise_fisher_error_naming_the_batch(kind: str, bad: float) -> None:
    x, y = data().tensors
    x = x.clone()
    x[17, 2] = bad  # in the third batch of 8
    with pytest.raises(FisherError, match=r"^batch 2: 1 NaN/\+Inf values in a batch tensor"):
        ewc.fisher_diagonal(mlp(), DataLoader(TensorDataset(x, y), batch_size=8), kind=kind)


def test_wrapped_models_are_regularized_through_their_module() -> None:
    """``nn.DataParallel`` (on a CPU it just calls the module) as a stand-in for DDP: the
    regularizer uses the inner names; fisher_diagonal keeps the wrapper's names."""
    model = mlp()
    wrapped = nn.DataParallel(model)
    reg = ewc.EWC(wrapped, lam=1.0)
    assert reg.model is model
    assert set(reg.importance) == {n for n, _ in model.named_parameters()}
    fisher = ewc.fisher_diagonal(wrapped, DataLoader(data(), batch_size=8))
    assert set(fisher) == {n for n, _ in wrapped.named_parameters()}


def consolidated(name: str = "ewc") -> QuadraticRegularizer:
    reg = REGULARIZERS[name](mlp())
    reg.consolidate(DataLoader(data(), batch_size=8))
    return reg


def corrupt(state: dict, key: str, value: object) -> dict:
    if key in ("importance", "anchor") and isinstance(value, float):
        tensors = {n: t.clone() for n, t in state[key].items()}
        tensors["0.weight"][0, 0] = value  # type: ignore[assignment]
        return {**state, key: tensors}
    return {**state, key: value}


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("importance", math.nan, "NaN or Inf"),
        ("anchor", math.inf, "NaN or Inf"),
        ("importance", -1.0, "negative"),
        ("n_tasks", -1, "n_tasks' must be an int >= 0"),
        ("n_tasks", 1.5, "n_tasks' must be an int >= 0"),
        ("lam", math.nan, "lam must be a finite number"),
        ("constant", -2.0, "constant' must be finite and >= 0"),
        ("gamma", 2.0, "gamma must lie in"),
        ("importance", "nonsense", "must map parameter names"),
    ],
)
def test_load_state_dict_refuses_bad_values_and_changes_nothing(
    key: str, value: object, message: str
) -> None:
    reg = consolidated()
    good = reg.state_dict()
    reg.lam = 7.0
    with pytest.raises(ValueError, match=message):
        reg.load_state_dict(corrupt(reg.state_dict(), key, value))
    assert reg.lam == 7.0
    for name, t in reg.importance.items():
        torch.testing.assert_close(t, good["importance"][name])


def test_si_may_load_negative_importance() -> None:
    reg = consolidated("si")
    state = corrupt(reg.state_dict(), "importance", -1.0)
    reg.load_state_dict(state)
    assert float(reg.importance["0.weight"][0, 0]) == -1.0


def test_fused_optimizer_falls_back_where_torch_has_no_fused_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ewc.runner import task

    class OldAdam(torch.optim.Adam):
        def __init__(self, params: object, lr: float, fused: bool | None = None) -> None:
            if fused:
                raise RuntimeError("`fused=True` requires all the params to be CUDA tensors")
            super().__init__(params, lr=lr)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.optim, "Adam", OldAdam)
    optimizer = task.make_optimizer("adam", 1e-3, mlp())
    assert isinstance(optimizer, OldAdam)
    assert not optimizer.defaults.get("fused")


def _autocast_forward(model: nn.Module, batch: tuple) -> tuple:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model(batch[0]), batch[1]


@pytest.mark.parametrize("where", ["inside forward", "around the call"])
def test_fisher_under_autocast_matches_float32(where: str) -> None:
    """Trainers (accelerate) run the forward under bfloat16 autocast: the rules get bf16 inputs
    and gradients of float32 layers, and compute in float32 (autocast off inside them)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 8),
        nn.LayerNorm(8),
        nn.Linear(8, 3),
    )
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g))]
    reference = ewc.fisher_diagonal(model, data)
    if where == "inside forward":
        mixed = ewc.fisher_diagonal(model, data, forward=_autocast_forward)
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = ewc.fisher_diagonal(model, data)
    for name, f in reference.items():
        assert mixed[name].dtype == torch.float32
        error = float((mixed[name] - f).abs().sum() / f.abs().sum())
        assert error < 0.05, (name, error)
