"""Tests of ewc.regularizers: the merged quadratic, each importance by hand, state, errors."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from ewc.fisher import FisherError, fisher_diagonal
from ewc.regularizers import (
    EWC,
    L2,
    MAS,
    REGULARIZERS,
    SI,
    OnlineEWC,
    QuadraticRegularizer,
    Regularizer,
    make_regularizer,
)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def batches(n: int = 12, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[: n // 2], y[: n // 2]), (x[n // 2 :], y[n // 2 :])]


def random_like(model: nn.Module, scale: float = 1.0, seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        n: scale * torch.randn(p.shape, generator=g, dtype=p.dtype)
        for n, p in model.named_parameters()
    }


def perturb(model: nn.Module, seed: int) -> None:
    with torch.no_grad():
        for p, d in zip(model.parameters(), random_like(model, 0.3, seed).values(), strict=True):
            p.add_(d)


def build(name: str, model: nn.Module) -> QuadraticRegularizer:
    return make_regularizer(name, model, lam=3.0)


def naive(model: nn.Module, lam: float, tasks: list[tuple[dict, dict]]) -> Tensor:
    """Σ_t (λ/2) Σ F_t (θ - θ_t)², one term per task, by hand."""
    named = dict(model.named_parameters())
    return sum(0.5 * lam * sum((f[n] * (named[n] - a[n]) ** 2).sum() for n in f) for f, a in tasks)


def grads(model: nn.Module, value: Tensor) -> list[Tensor]:
    return list(torch.autograd.grad(value, list(model.parameters())))


@pytest.mark.parametrize("name", list(REGULARIZERS))
def test_penalty_is_a_zero_tensor_before_consolidate(name: str) -> None:
    model = mlp()
    reg = build(name, model)
    assert isinstance(reg, Regularizer)
    value = reg.penalty()
    assert isinstance(value, Tensor) and value.ndim == 0 and value.item() == 0.0
    loss = model(batches()[0][0]).sum() + value
    loss.backward()
    before = [p.grad.clone() for p in model.parameters()]
    reg.add_penalty_grad()
    assert all(torch.equal(b, p.grad) for b, p in zip(before, model.parameters(), strict=True))


def test_separate_mode_equals_naive_sum_in_value_and_gradient() -> None:
    model = mlp()
    reg = EWC(model, lam=7.0)
    tasks = []
    for t in range(3):
        perturb(model, seed=10 + t)
        fisher = {n: v.abs() for n, v in random_like(model, seed=t).items()}
        fisher["0.bias"][:2] = 0.0  # zeros: merged anchor there must stay well defined
        tasks.append((fisher, {n: p.detach().clone() for n, p in model.named_parameters()}))
        reg.add_task(fisher)
    perturb(model, seed=99)
    expected = naive(model, 7.0, tasks)
    got = reg.penalty()
    assert reg.constant > 0
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads(model, got), grads(model, expected), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_separate_anchor_is_latest_theta_where_total_importance_is_zero() -> None:
    model = mlp()
    reg = EWC(model, lam=1.0)
    zero = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    reg.add_task(zero)
    perturb(model, seed=1)
    reg.add_task(zero)
    for n, p in model.named_parameters():
        assert torch.equal(reg.anchor[n], p.detach())
    assert reg.penalty().item() == 0.0


def test_add_penalty_grad_equals_autograd_gradient_of_penalty() -> None:
    model = mlp()
    reg = EWC(model, lam=5.0)
    reg.add_task({n: v.abs() for n, v in random_like(model).items()})
    perturb(model, seed=3)
    expected = grads(model, reg.penalty())
    reg.add_penalty_grad()  # creates .grad where it is None
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-12, atol=1e-14)
    reg.add_penalty_grad()  # adds to an existing .grad
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, 2 * e, rtol=1e-12, atol=1e-14)


def test_gradient_and_proximal_paths_skip_frozen_parameters() -> None:
    model = mlp()
    reg = L2(model, lam=1.0)
    reg.consolidate()
    perturb(model, seed=1)
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    reg.add_penalty_grad()
    assert model[0].weight.grad is None
    assert model[2].weight.grad is not None
    reg.proximal_step(0.1)
    assert torch.equal(model[0].weight, frozen)
    assert not torch.equal(model[2].weight, reg.anchor["2.weight"])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), frozen=st.booleans(), lr=st.floats(1e-3, 10.0))
def test_foreach_and_per_tensor_paths_give_identical_steps(
    seed: int, frozen: bool, lr: float
) -> None:
    """``reg.foreach`` only changes how θ - θ̄ is formed (one multi-tensor kernel, the GPU
    default, or per-tensor ``out=`` into a kept buffer, the CPU default): the penalty gradient
    and the proximal step are bit-for-bit the same, frozen parameters included."""
    results = []
    for foreach in (False, True):
        model = mlp(seed)
        reg = EWC(model, lam=7.0)
        reg.foreach = foreach
        reg.add_task({n: v.abs() for n, v in random_like(model, seed=seed).items()})
        perturb(model, seed=seed + 1)
        model[0].weight.requires_grad_(not frozen)  # frozen after consolidation: skipped
        reg.add_penalty_grad()
        reg.add_penalty_grad()  # the second call adds to the .grad the first created
        grads_after = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        reg.proximal_step(lr)
        results.append((grads_after, [p.detach().clone() for p in model.parameters()]))
    (grads_loop, params_loop), (grads_foreach, params_foreach) = results
    for a, b in zip(grads_loop + params_loop, grads_foreach + params_foreach, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    assert (model[0].weight.grad is None) == frozen


def test_add_penalty_grad_compiles_into_one_graph() -> None:
    """Under ``torch.compile(fullgraph=True)`` (a training step users compile) the penalty
    gradient traces without a graph break and equals the eager one."""
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    reg = EWC(model, lam=5.0)
    reg.add_task({n: v.abs().float() for n, v in random_like(model).items()})
    perturb(model, seed=3)
    reg.add_penalty_grad()
    eager = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=False)
    torch.compile(reg.add_penalty_grad, fullgraph=True, backend="eager")()
    for p, e in zip(model.parameters(), eager, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-6, atol=1e-7)


def test_penalty_supports_hessian_vector_products() -> None:
    model = mlp()
    reg = EWC(model, lam=3.0)
    reg.add_task({n: v.abs() for n, v in random_like(model).items()})
    perturb(model, seed=1)
    params = list(model.parameters())
    g = torch.autograd.grad(reg.penalty(), params, create_graph=True)
    v = list(random_like(model, seed=2).values())
    hvp = torch.autograd.grad(sum((a * b).sum() for a, b in zip(g, v, strict=True)), params)
    for h, o, w in zip(hvp, reg.importance.values(), v, strict=True):
        torch.testing.assert_close(h, 3.0 * o * w)


def test_online_decays_old_importance_and_anchors_at_the_latest_task() -> None:
    model = mlp()
    fishers = iter([random_like(model, seed=1), random_like(model, seed=2)])

    reg = OnlineEWC(model, lam=2.0, gamma=0.5)
    f1 = {n: v.abs() for n, v in next(fishers).items()}
    f2 = {n: v.abs() for n, v in next(fishers).items()}
    reg.add_task(f1)
    perturb(model, seed=5)
    reg.add_task(f2)
    for n, p in model.named_parameters():
        torch.testing.assert_close(reg.importance[n], 0.5 * f1[n] + f2[n])
        assert torch.equal(reg.anchor[n], p.detach())
    assert reg.constant == 0.0 and reg.mode == "online" and reg.n_tasks == 2


@pytest.mark.parametrize("gamma", [1.0, 0.3])
def test_online_and_separate_ewc_are_bit_identical_after_one_task(gamma: float) -> None:
    """With one task consolidated the two modes hold the same state (importance F, anchor θ*,
    no constant), whatever γ: on a two-task stream online EWC and EWC train identically, which
    docs/results.md relies on for the seed experiment. They part from the second task on."""
    states = []
    for cls in (EWC, OnlineEWC):
        model = mlp()
        reg = cls(model, lam=3.0, **({"gamma": gamma} if cls is OnlineEWC else {}))
        reg.consolidate(batches())
        perturb(model, seed=2)
        reg.add_penalty_grad()
        states.append(
            (reg.importance, reg.anchor, reg.constant, [p.grad for p in model.parameters()])
        )
    (f1, a1, c1, g1), (f2, a2, c2, g2) = states
    assert c1 == c2 == 0.0
    for x, y in zip(
        [*f1.values(), *a1.values(), *g1], [*f2.values(), *a2.values(), *g2], strict=True
    ):
        assert torch.equal(x, y)


def test_ewc_consolidate_uses_the_real_fisher() -> None:
    model = mlp()
    data = batches()
    reg = EWC(model, lam=1.0, fisher="empirical")
    reg.consolidate(data)
    expected = fisher_diagonal(model, data, kind="empirical")
    for n in expected:
        torch.testing.assert_close(reg.importance[n], expected[n])
        torch.testing.assert_close(reg.anchor[n], dict(model.named_parameters())[n].detach())


def test_ewc_consolidate_passes_its_options_to_fisher_diagonal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen = {}

    def spy(model: nn.Module, batches: object, **kwargs: object) -> dict[str, Tensor]:
        seen.update(kwargs)
        return {n: torch.ones_like(p) for n, p in model.named_parameters()}

    monkeypatch.setattr("ewc.regularizers.ewc.fisher_diagonal", spy)

    def fwd(m: nn.Module, b: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return m(b[0]), b[1]

    reg = EWC(
        mlp(),
        lam=1.0,
        fisher="sampled",
        fisher_samples=7,
        likelihood="gaussian",
        forward=fwd,
        distributed=False,
    )
    reg.consolidate(batches())
    assert seen == dict(
        kind="sampled", likelihood="gaussian", n_samples=7, forward=fwd, distributed=False
    )


class Scalar(nn.Module):
    def __init__(self, w: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([w], dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return self.w * x


def test_si_importance_by_hand() -> None:
    # loss = w², SGD lr 0.25 from w = 1: g = 2 then w = 0.5; g = 1 then w = 0.25.
    model = Scalar(1.0)
    reg = SI(model, lam=4.0, xi=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.25)
    for _ in range(2):
        opt.zero_grad()
        (model.w**2).sum().backward()
        opt.step()
        reg.after_step()
    reg.consolidate()
    omega = -(2.0 * -0.5 + 1.0 * -0.25)  # 1.25
    expected = omega / ((0.25 - 1.0) ** 2 + 0.1)
    assert reg.importance["w"].item() == pytest.approx(expected, rel=1e-12)
    assert reg.anchor["w"].item() == 0.25
    state = reg.state_dict()
    assert state["path"]["w"].item() == 0.0 and state["start"]["w"].item() == 0.25
    with torch.no_grad():
        model.w.fill_(1.25)
    assert reg.penalty().item() == pytest.approx(0.5 * 4.0 * expected * 1.0, rel=1e-12)


def test_si_integrates_the_gradient_including_the_penalty() -> None:
    # Task 2 with the penalty in .grad: ω += -(g_task + λΩ(w - w*))·Δw.
    model = Scalar(1.0)
    reg = SI(model, lam=2.0, xi=1.0)
    reg.add_task({"w": torch.tensor([0.5], dtype=torch.float64)})  # anchor 1.0, Ω 0.5
    model.w.grad = torch.tensor([0.0], dtype=torch.float64)
    with torch.no_grad():
        model.w.fill_(2.0)
    reg.add_penalty_grad()  # grad = 2·0.5·(2 - 1) = 1
    reg.after_step()  # Δw = 1 since construction
    assert reg.state_dict()["path"]["w"].item() == pytest.approx(-1.0)


def test_si_consolidate_refuses_a_task_trained_without_after_step() -> None:
    """Weights moved but after_step() never ran: the importance would be silently zero, so
    consolidate refuses and leaves the state as it was; an untouched model consolidates."""
    model = mlp()
    reg = SI(model, lam=1.0)
    reg.consolidate()  # nothing moved: zero importance is the right answer
    perturb(model, seed=1)
    with pytest.raises(ValueError, match=r"after_step\(\) was never called"):
        reg.consolidate()
    assert reg.n_tasks == 1


def test_si_skips_parameters_without_grad() -> None:
    model = mlp()
    reg = SI(model, lam=1.0)
    perturb(model, seed=1)
    reg.after_step()
    assert all(t.abs().sum() == 0 for t in reg.state_dict()["path"].values())


def test_mas_importance_by_hand() -> None:
    # f(x) = w·x + b: |∂f²/∂w_j| = 2|f| |x_j|, |∂f²/∂b| = 2|f|, averaged over samples.
    model = nn.Linear(2, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0]]))
        model.bias.fill_(0.5)
    x = torch.tensor([[1.0, 1.0], [2.0, -1.0], [0.0, 3.0]], dtype=torch.float64)
    f = (x @ torch.tensor([1.0, -2.0], dtype=torch.float64) + 0.5).abs()  # 0.5, 4.5, 5.5
    model.train()
    reg = MAS(model, lam=1.0)
    reg.consolidate([(x[:2], torch.zeros(2)), (x[2:], torch.zeros(1))])
    torch.testing.assert_close(reg.importance["weight"], (2 * f[:, None] * x.abs()).mean(0)[None])
    torch.testing.assert_close(reg.importance["bias"], (2 * f).mean(0, keepdim=True))
    assert model.training and model.weight.grad is None and model.bias.grad is None


def test_mas_linear_model_without_bias_and_custom_forward() -> None:
    # f(x) = w x: |∂(w x)²/∂w| = 2|w| x², averaged; batches as dicts through forward=.
    model = nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(-1.5)
    x = torch.tensor([[1.0], [2.0], [-3.0]], dtype=torch.float64)

    def fwd(m: nn.Module, b: dict[str, Tensor]) -> tuple[Tensor, None]:
        return m(b["x"]), None

    reg = MAS(model, lam=1.0, forward=fwd)
    reg.consolidate([{"x": x}])
    expected = 2 * 1.5 * (x**2).mean()
    assert reg.importance["weight"].item() == pytest.approx(expected.item(), rel=1e-12)


def test_mas_matches_a_per_sample_loop_on_an_mlp() -> None:
    model = mlp()
    data = batches(10)
    reg = MAS(model, lam=1.0)
    reg.consolidate(data)
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x, _ in data:
        for xi in x:
            model.zero_grad()
            model(xi[None]).square().sum().backward()
            for n, p in model.named_parameters():
                total[n] += p.grad.abs()
    for n, t in total.items():
        torch.testing.assert_close(reg.importance[n], t / 10)


def test_l2_is_uniform_importance_merged_as_separate_penalties() -> None:
    model = mlp()
    reg = L2(model, lam=2.0)
    anchors = []
    for t in range(2):
        perturb(model, seed=t)
        anchors.append({n: p.detach().clone() for n, p in model.named_parameters()})
        reg.consolidate()
    perturb(model, seed=7)
    for n in reg.importance:
        assert torch.all(reg.importance[n] == 2.0)
        torch.testing.assert_close(reg.anchor[n], (anchors[0][n] + anchors[1][n]) / 2)
    ones = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    expected = naive(model, 2.0, [(ones, a) for a in anchors])
    torch.testing.assert_close(reg.penalty(), expected, rtol=1e-12, atol=1e-12)


def test_proximal_step_is_the_closed_form_and_matches_sgd_for_small_steps() -> None:
    model = mlp()
    reg = EWC(model, lam=50.0)
    reg.add_task({n: v.abs() for n, v in random_like(model).items()})
    perturb(model, seed=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    explicit = dict(zip(before, grads(model, reg.penalty()), strict=True))
    lr = 1e-6
    reg.proximal_step(lr)
    for n, p in model.named_parameters():
        o, a = reg.importance[n], reg.anchor[n]
        torch.testing.assert_close(
            p.detach(), (before[n] + lr * 50.0 * o * a) / (1 + lr * 50.0 * o)
        )
        torch.testing.assert_close((before[n] - p.detach()) / lr, explicit[n], rtol=1e-3, atol=1e-8)
    reg.proximal_step(1e9)  # huge steps land on the anchor instead of diverging
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), reg.anchor[n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["ewc", "si"])
def test_state_round_trips_through_torch_save(name: str, tmp_path: object) -> None:
    model = mlp()
    kwargs = dict(lam=3.0, mode="online", gamma=0.7) if name == "ewc" else dict(lam=3.0, xi=0.2)
    reg = make_regularizer(name, model, **kwargs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for t in range(2):
        for x, y in batches(seed=t):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            reg.after_step()
        reg.consolidate(batches(seed=t))
    opt.step()
    reg.after_step()  # SI: a path integral in progress
    path = tmp_path / "reg.pt"  # type: ignore[operator]
    torch.save(reg.state_dict(), path)

    other = make_regularizer(name, mlp(seed=1), lam=1.0)
    with torch.no_grad():
        for p, q in zip(other.model.parameters(), model.parameters(), strict=True):
            p.copy_(q)
    other.load_state_dict(torch.load(path, weights_only=True))
    assert other.n_tasks == 2 and other.lam == 3.0 and other.mode == reg.mode
    assert other.gamma == reg.gamma
    torch.testing.assert_close(other.penalty(), reg.penalty(), rtol=0, atol=0)
    for k, v in reg.state_dict().items():
        w = other.state_dict()[k]
        if isinstance(v, dict):
            assert all(torch.equal(v[n], w[n]) for n in v)
        else:
            assert v == w


def test_separate_constant_round_trips() -> None:
    model = mlp()
    reg = EWC(model, lam=1.0)
    reg.add_task({n: v.abs() for n, v in random_like(model).items()})
    perturb(model, seed=1)
    reg.add_task({n: v.abs() for n, v in random_like(model, seed=1).items()})
    other = EWC(model, lam=1.0)
    other.load_state_dict(reg.state_dict())
    assert other.constant == reg.constant > 0
    assert other.penalty().item() == reg.penalty().item()


def test_load_into_a_mismatched_model_names_the_mismatches() -> None:
    state = EWC(mlp(), lam=1.0).state_dict()
    wider = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    with pytest.raises(ValueError, match=r"shape mismatches: \['0.weight: \(5, 4\) vs parameter"):
        EWC(wider, lam=1.0).load_state_dict(state)
    renamed = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Identity(), nn.Linear(5, 3)).double()
    with pytest.raises(ValueError, match=r"not among the model's trainable parameters: \['2.bias'"):
        EWC(renamed, lam=1.0).load_state_dict(state)
    frozen = mlp()
    frozen[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"'0.bias'"):
        EWC(frozen, lam=1.0).load_state_dict(state)


def test_load_rejects_another_type_and_missing_keys() -> None:
    model = mlp()
    with pytest.raises(ValueError, match=r"saved by EWC, not SI; build ewc.EWC\(model"):
        SI(model, lam=1.0).load_state_dict(EWC(model, lam=1.0).state_dict())
    state = EWC(model, lam=1.0).state_dict()
    del state["n_tasks"]
    with pytest.raises(ValueError, match=r"lacks key\(s\) \['n_tasks'\]"):
        EWC(model, lam=1.0).load_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(lam=-1.0), "lam must be >= 0; got lam=-1.0"),
        (dict(lam=math.nan), "lam must be a finite number >= 0; got lam=nan"),
        (dict(lam=math.inf), "lam must be a finite number >= 0; got lam=inf"),
        (dict(lam=1.0, mode="online", gamma=0.0), r"gamma must lie in \(0, 1\]; got gamma=0.0"),
        (dict(lam=1.0, mode="online", gamma=1.5), r"gamma must lie in \(0, 1\]; got gamma=1.5"),
        (dict(lam=1.0, gamma=0.5), "gamma=0.5 only applies with mode='online'"),
        (dict(lam=1.0, mode="merged"), "unknown mode='merged'; choose one of separate, online"),
        (dict(lam=1.0, fisher="diag"), "unknown fisher='diag'; choose one of exact, sampled"),
        (dict(lam=1.0, fisher_samples=0), "fisher_samples must be a positive int or None"),
    ],
)
def test_bad_ewc_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EWC(mlp(), **kwargs)


@pytest.mark.parametrize(
    "call",
    [
        lambda: make_regularizer("ewc", mlp(), lam=1.0, distributed="no"),
        lambda: make_regularizer("mas", mlp(), lam=1.0, distributed="no"),
        lambda: make_regularizer("kfac", mlp(), lam=1.0, distributed="no"),
        lambda: fisher_diagonal(mlp(), batches(), distributed="no"),
    ],
    ids=["ewc", "mas", "kfac", "fisher_diagonal"],
)
def test_a_distributed_flag_that_is_not_a_bool_is_refused(call: Any) -> None:
    """``distributed="no"`` would read as true (and all-reduce); it is refused, named."""
    with pytest.raises(
        ValueError, match=r"distributed must be True or False; got distributed='no'"
    ):
        call()


@pytest.mark.parametrize("xi", [0.0, -1.0, math.nan])
def test_bad_si_xi(xi: float) -> None:
    with pytest.raises(ValueError, match=f"xi must be finite and > 0; got xi={xi}"):
        SI(mlp(), lam=1.0, xi=xi)


def test_model_without_trainable_parameters() -> None:
    model = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="Sequential has no trainable parameters"):
        L2(model, lam=1.0)


def test_unknown_regularizer_name_lists_the_valid_ones() -> None:
    with pytest.raises(
        ValueError, match="unknown regularizer 'ewc2'; choose one of ewc, online-ewc, si, mas, l2"
    ):
        make_regularizer("ewc2", mlp(), lam=1.0)


def test_online_ewc_refuses_a_mode() -> None:
    with pytest.raises(ValueError, match="OnlineEWC is always mode='online'"):
        OnlineEWC(mlp(), lam=1.0, mode="separate")


def test_consolidate_without_or_with_empty_batches() -> None:
    with pytest.raises(ValueError, match=r"EWC.consolidate\(\) needs batches"):
        EWC(mlp(), lam=1.0).consolidate()
    with pytest.raises(ValueError, match=r"MAS.consolidate\(\) needs batches"):
        MAS(mlp(), lam=1.0).consolidate()
    with pytest.raises(ValueError, match=r"method='loop' is not one of \['auto', 'hooks'"):
        MAS(mlp(), lam=1.0, method="loop")
    with pytest.raises(ValueError, match=r"batches yielded no samples"):
        MAS(mlp(), lam=1.0).consolidate([])
    with pytest.raises(FisherError, match="batches yielded no samples"):  # propagated
        EWC(mlp(), lam=1.0).consolidate([])


def test_bad_importance_is_rejected() -> None:
    model = mlp()
    reg = EWC(model, lam=1.0)
    good = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"importance has NaN or Inf values in \['2.bias'\]"):
        reg.add_task({**good, "2.bias": torch.tensor([1.0, math.nan, 0.0])})
    with pytest.raises(
        ValueError,
        match=r"mode='separate' needs importance >= 0; negative .*"
        r"\['0.weight'\]",
    ):
        reg.add_task({**good, "0.weight": -good["0.weight"]})
    with pytest.raises(
        ValueError,
        match=r"names not among the model's trainable parameters: "
        r"\['head.weight'\]",
    ):
        reg.add_task({**good, "head.weight": torch.ones(1)})
    with pytest.raises(ValueError, match=r"shape mismatches: \['2.bias: \(2,\) vs parameter"):
        reg.add_task({**good, "2.bias": torch.ones(2)})
    with pytest.raises(ValueError, match="lr must be finite and > 0; got lr=0"):
        reg.proximal_step(0)
    assert reg.n_tasks == 0


def test_importance_of_a_wrapped_model_is_read_without_the_module_prefix() -> None:
    """``fisher_diagonal(wrapper, ...)`` names parameters ``module.*``, as the wrapper's
    named_parameters() does; a regularizer of the same wrapper takes them as they are."""
    model = mlp()
    wrapped = nn.DataParallel(model)
    fisher = fisher_diagonal(wrapped, batches())
    assert all(n.startswith("module.") for n in fisher)
    via_wrapper, direct = EWC(wrapped, lam=1.0), EWC(model, lam=1.0)
    via_wrapper.add_task(fisher)
    direct.add_task(fisher_diagonal(model, batches()))
    for name, value in direct.importance.items():
        assert torch.equal(via_wrapper.importance[name], value)


def test_parameters_unfrozen_after_building_are_named_with_the_fix() -> None:
    """The regularizer keeps the parameters trainable when it was built; importance for one
    unfrozen later is refused by name, saying to build the regularizer after unfreezing."""
    model = mlp()
    model[0].requires_grad_(False)
    reg = EWC(model, lam=1.0)
    model[0].requires_grad_(True)
    with pytest.raises(ValueError, match=r"\['0.bias', '0.weight'\].*build it after freezing"):
        reg.consolidate(batches())


def test_nan_from_a_diverged_model_is_caught_at_consolidate() -> None:
    model = mlp()
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan
    with pytest.raises(ValueError, match=r"batch 0: the model's output holds \d+ NaN"):
        MAS(model, lam=1.0).consolidate(batches())


def test_lam_can_be_changed_but_is_validated() -> None:
    reg = L2(mlp(), lam=1.0)
    reg.lam = 2
    assert reg.lam == 2.0
    with pytest.raises(ValueError, match="lam must be >= 0"):
        reg.lam = -3


def test_memory_does_not_grow_with_the_number_of_tasks() -> None:
    def footprint(n_tasks: int) -> tuple[int, int]:
        model = mlp()
        reg = EWC(model, lam=1.0)
        for t in range(n_tasks):
            perturb(model, seed=t)
            reg.add_task({n: v.abs() for n, v in random_like(model, seed=t).items()})
        tensors = [t for v in reg.state_dict().values() if isinstance(v, dict) for t in v.values()]
        tensors += [t for t in vars(reg).values() if isinstance(t, Tensor)]
        tensors += [
            t for v in vars(reg).values() if isinstance(v, list) for t in v if isinstance(t, Tensor)
        ]
        return len(tensors), sum(t.numel() for t in tensors)

    assert footprint(1) == footprint(50)


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
    lam=st.floats(0.0, 1e4),
    sparsity=st.floats(0.0, 0.9),
)
def test_merged_penalty_matches_naive_sum_property(
    k: int, seed: int, lam: float, sparsity: float
) -> None:
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(3, 2).double()
    reg = EWC(model, lam=lam)
    tasks = []
    for _ in range(k):
        fisher = {
            n: torch.rand(p.shape, generator=g, dtype=p.dtype).exp_().sub_(1)
            * (torch.rand(p.shape, generator=g) > sparsity)
            for n, p in model.named_parameters()
        }
        anchor = {
            n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()
        }
        reg.add_task(fisher, anchor)
        tasks.append((fisher, anchor))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    expected = naive(model, lam, tasks)
    got = reg.penalty()
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    for a, b in zip(grads(model, got), grads(model, expected), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
