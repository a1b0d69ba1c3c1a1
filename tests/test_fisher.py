"""ewc.fisher: every fast path against the plain per-sample loop, plus the contract around it."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn import functional as F

from ewc import MAS
from ewc.fisher import (
    BernoulliLikelihood,
    CategoricalLikelihood,
    FisherError,
    GaussianLikelihood,
    Likelihood,
    fisher_diagonal,
    register_rule,
)
from ewc.fisher.batching import batch_size, default_forward, take

PER_SAMPLE_KINDS = ["exact", "sampled", "empirical"]


def assert_fisher_close(actual: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    """Same names, shapes and dtypes; values equal to 1e-5 of each tensor's largest entry."""
    assert list(actual) == list(expected)
    for name, e in expected.items():
        a = actual[name]
        assert a.shape == e.shape and a.dtype == e.dtype, name
        scale = float(e.abs().max())
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * scale + 1e-300, msg=name)


def pairs(x: Any, y: Tensor, sizes: tuple[int, ...] = (5, 4)) -> list[tuple[Any, Tensor]]:
    """Cut ``(x, y)`` into consecutive batches of ``sizes``."""
    out, start = [], 0
    for size in sizes:
        out.append((x[start : start + size], y[start : start + size]))
        start += size
    return out


class Scale(nn.Module):
    """A layer without a registered rule: ``x * scale + shift`` (hits the generic fallback)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, dim))
        self.shift = nn.Parameter(torch.linspace(-0.2, 0.2, dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift * self.scale


class Bag(nn.Module):
    """Embedding -> mean over tokens -> LayerNorm -> Linear (2-D and token-wise 3-D Linear)."""

    def __init__(self, vocab: int = 7, dim: int = 4, n_out: int = 3, **embedding: Any) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, **embedding)
        self.token = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_out)

    def forward(self, tokens: Tensor) -> Tensor:
        h = torch.tanh(self.token(self.embed(tokens)))  # [N, T, D]: Linear on 3-D input
        return self.head(self.norm(h.mean(1)))


class Positional(nn.Module):
    """Token and position embeddings, as in BERT: the position ids are ``[1, T]``, so the
    position embedding returns one row that the addition broadcasts over the batch."""

    def __init__(self, vocab: int = 7, dim: int = 4, n_out: int = 3, squeeze: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(6, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_out)
        self.squeeze = squeeze  # code that relies on the one row: pos.view(T, D)

    def forward(self, tokens: Tensor) -> Tensor:
        pos = self.position(torch.arange(tokens.shape[1]).unsqueeze(0))
        if self.squeeze:
            pos = pos.view(tokens.shape[1], -1)
        return self.head(self.norm(torch.tanh(self.embed(tokens) + pos)).mean(1))


@dataclass
class Case:
    """A model and its data for the method-vs-loop comparisons."""

    model: Callable[[], nn.Module]
    batches: Callable[[], list[Any]]
    forward: Callable[[nn.Module, Any], tuple[Tensor, Any]] | None = None
    likelihood: Any = "categorical"


def _images(channels: int = 2, side: int = 8) -> list[tuple[Tensor, Tensor]]:
    return pairs(torch.randn(9, channels, side, side), torch.randint(0, 4, (9,)))


def _vectors(dim: int = 6, classes: int = 4) -> list[tuple[Tensor, Tensor]]:
    return pairs(torch.randn(9, dim), torch.randint(0, classes, (9,)))


def _tokens(vocab: int = 7) -> list[tuple[Tensor, Tensor]]:
    tokens = torch.randint(0, vocab, (9, 6))
    tokens[:, :3] = tokens[:, 3:]  # repeated indices within a sample
    return pairs(tokens, torch.randint(0, 3, (9,)))


class Tagger(nn.Module):
    """Token ids ``[N, T]`` -> logits ``[N, T, 3]``, the positions mixed by a convolution (a
    token classifier; a language model's logits have the same shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.mix = nn.Conv1d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        mixed = torch.relu(self.mix(self.embed(x).transpose(1, 2)))
        return self.head(mixed.transpose(1, 2))


def _tags() -> list[tuple[Tensor, Tensor]]:
    """Token ids ``[9, 5]`` and tags ``[9, 5]``, padding (``-100``) at the end of every other
    sequence."""
    tokens, tags = torch.randint(0, 7, (9, 5)), torch.randint(0, 3, (9, 5))
    tags[::2, 3:] = -100
    return pairs(tokens, tags)


ACTIVE = torch.tensor([False, True, True, False, True])


def _masked(model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
    return model(batch[0]).masked_fill(~ACTIVE, float("-inf")), batch[1]


def _by_key(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    return model(batch["image"], scale=batch["scale"]), batch["label"]


class KeywordNet(nn.Module):
    """Takes an extra per-sample keyword argument (fed from a dict batch via ``forward=``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3)
        self.fc = nn.Linear(4 * 6, 4)

    def forward(self, x: Tensor, scale: Tensor) -> Tensor:
        return self.fc(F.relu(self.conv(x * scale[:, None, None])).flatten(1))


def _dict_batches() -> list[dict[str, Tensor]]:
    x, y, s = torch.randn(9, 3, 8), torch.randint(0, 4, (9,)), torch.rand(9)
    return [{"image": x[a:b], "label": y[a:b], "scale": s[a:b]} for a, b in ((0, 5), (5, 9))]


def _frozen_mlp() -> nn.Module:
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 4))
    model[0].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    return model


CASES = {
    "mlp": Case(
        lambda: nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 4)), _vectors
    ),
    "cnn": Case(
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 4 * 4, 4),
        ),
        _images,
    ),
    "batchnorm-dropout": Case(
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3),
            nn.BatchNorm2d(3),
            nn.ReLU(),
            nn.Flatten(),
            nn.Dropout(0.5),
            nn.Linear(3 * 6 * 6, 5),
            nn.BatchNorm1d(5),
            nn.Linear(5, 4),
        ),
        _images,
    ),
    "groupnorm-conv1d": Case(
        lambda: nn.Sequential(
            nn.Conv1d(2, 4, 3, stride=2, dilation=2, padding=2, padding_mode="reflect"),
            nn.GroupNorm(2, 4),
            nn.Conv1d(4, 4, 3, groups=2, padding="same"),
            nn.Flatten(),
            nn.Linear(16, 4),
        ),
        lambda: pairs(torch.randn(9, 2, 8), torch.randint(0, 4, (9,))),
    ),
    "frozen": Case(_frozen_mlp, _vectors),
    "generic": Case(lambda: nn.Sequential(nn.Linear(6, 5), Scale(5), nn.Linear(5, 4)), _vectors),
    "embedding-layernorm": Case(lambda: Bag(padding_idx=2), _tokens),
    "embedding-scale-grad-by-freq": Case(lambda: Bag(scale_grad_by_freq=True), _tokens),
    "broadcast-position-embedding": Case(Positional, _tokens),
    "gaussian": Case(
        lambda: nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)),
        lambda: pairs(torch.randn(9, 6), torch.randn(9, 3)),
        likelihood=GaussianLikelihood(0.5),
    ),
    "bernoulli-multilabel": Case(
        lambda: nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)),
        lambda: pairs(torch.randn(9, 6), torch.randint(0, 2, (9, 3)).float()),
        likelihood="bernoulli",
    ),
    "masked-logits": Case(
        lambda: nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 5)),
        lambda: pairs(torch.randn(9, 6), torch.tensor([1, 2, 4, 4, 1, 2, 2, 1, 4])),
        forward=_masked,
    ),
    "dict-batch": Case(KeywordNet, _dict_batches, forward=_by_key),
    "token-logits": Case(lambda: Tagger(), lambda: _tags()),
}


def _setup(case: Case) -> tuple[Any, list[Any]]:
    torch.manual_seed(0)
    model = case.model().double()
    batches = [
        tuple(t.double() if t.is_floating_point() else t for t in b)
        if isinstance(b, tuple)
        else {k: t.double() if t.is_floating_point() else t for k, t in b.items()}
        for b in case.batches()
    ]
    return model, batches


@pytest.mark.parametrize("kind", PER_SAMPLE_KINDS)
@pytest.mark.parametrize("name", list(CASES))
def test_hooks_and_func_match_the_per_sample_loop(name: str, kind: str) -> None:
    case = CASES[name]
    model, batches = _setup(case)
    common = {"kind": kind, "likelihood": case.likelihood, "forward": case.forward}
    reference = fisher_diagonal(model, batches, method="loop", **common)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert list(reference) == trainable
    assert all(float(f.abs().max()) > 0 for f in reference.values())
    for method in ("hooks", "func"):
        assert_fisher_close(fisher_diagonal(model, batches, method=method, **common), reference)


@pytest.mark.parametrize("method", ["loop", "hooks", "func"])
def test_predicted_kind_is_the_empirical_fisher_of_the_models_own_labels(method: str) -> None:
    """``kind="predicted"`` (van de Ven & Tolias 2019's estimate) equals the empirical Fisher of
    batches relabelled with the model's argmax, whichever method computes it; masked logits are
    never predicted."""
    case = CASES["masked-logits"]
    model, batches = _setup(case)
    with torch.no_grad():
        relabelled = [(x, _masked(model, (x, y))[0].argmax(1)) for x, y in batches]
    assert all(bool(ACTIVE[y].all()) for _, y in relabelled)
    expected = fisher_diagonal(model, relabelled, "empirical", forward=case.forward, method="loop")
    got = fisher_diagonal(model, batches, "predicted", forward=case.forward, method=method)
    assert_fisher_close(got, expected)
    assert not all(torch.equal(a, b) for (_, a), (_, b) in zip(batches, relabelled, strict=True))


def test_predicted_kind_needs_a_likelihood_with_predict() -> None:
    """A Gaussian's predicted target is its mean, where the gradient vanishes: refused, named."""
    with pytest.raises(FisherError, match=r"has no method predict\(\), which kind='predicted'"):
        fisher_diagonal(_mlp(), _vectors(), "predicted", likelihood="gaussian")


@pytest.mark.parametrize("name", ["masked-logits", "mlp", "cnn"])
def test_exact_categorical_is_the_expectation_over_classes(name: str) -> None:
    """Independent of exact_output_grads: sum_c p_c (d log p_c / d theta)^2, sample by sample
    and class by class (masked classes have p_c = 0), in float64."""
    case = CASES[name]
    model, batches = _setup(case)
    forward = case.forward or default_forward
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for x, y in batches:
        for i in range(len(x)):
            log_p = torch.log_softmax(forward(model, (x[i : i + 1], y[i : i + 1]))[0], 1)[0]
            for c in torch.nonzero(torch.isfinite(log_p)).flatten().tolist():
                grads = torch.autograd.grad(log_p[c], list(model.parameters()), retain_graph=True)
                for (n, _), g in zip(model.named_parameters(), grads, strict=True):
                    expected[n] += log_p[c].exp().detach() * g.square()
    expected = {n: f / 9 for n, f in expected.items()}
    assert_fisher_close(fisher_diagonal(model, batches, forward=case.forward), expected)


def test_exact_gaussian_is_closed_form_for_a_linear_model() -> None:
    """y = Wx + b, N(y; f, sigma^2): F_W[k, j] = mean_i x_ij^2 / sigma^2 and F_b = 1 / sigma^2."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3).double()
    x = torch.randn(9, 6, dtype=torch.float64)
    fisher = fisher_diagonal(model, pairs(x, torch.zeros(9, 3)), likelihood=GaussianLikelihood(0.5))
    weight = (x.square().mean(0) / 0.25).expand(3, 6)
    assert_fisher_close(fisher, {"weight": weight, "bias": torch.full((3,), 4.0).double()})


@pytest.mark.parametrize("squeeze", [False, True])
def test_exact_bernoulli_is_the_expectation_over_both_labels(squeeze: bool) -> None:
    """A binary classifier with one logit, ``[N, 1]`` or squeezed to ``[N]``: independent of
    exact_output_grads, p (d log p / d theta)^2 + (1 - p)(d log(1 - p) / d theta)^2 per sample;
    the sampled kind averages to it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    x, y = torch.randn(9, 6, dtype=torch.float64), torch.randint(0, 2, (9,)).double()

    def forward(m: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
        out = m(batch[0])
        return (out.squeeze(1), batch[1]) if squeeze else (out, batch[1][:, None])

    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(9):
        z = model(x[i : i + 1])[0, 0]
        for log_p in (F.logsigmoid(z), F.logsigmoid(-z)):
            grads = torch.autograd.grad(log_p, list(model.parameters()), retain_graph=True)
            for (n, _), g in zip(model.named_parameters(), grads, strict=True):
                expected[n] += log_p.exp().detach() * g.square() / 9
    batches = pairs(x, y)
    assert_fisher_close(
        fisher_diagonal(model, batches, likelihood="bernoulli", forward=forward), expected
    )
    sampled = [
        fisher_diagonal(model, batches, "sampled", "bernoulli", forward=forward, seed=s)
        for s in range(300)
    ]
    for n, e in expected.items():
        mean = torch.stack([f[n] for f in sampled]).mean(0)
        assert float((mean - e).abs().max()) < 0.15 * float(e.abs().max()), n


def test_one_output_unit_is_refused_by_the_categorical_likelihood() -> None:
    """Softmax over one logit is 1 for any weights: the Fisher would be silently zero, so the
    categorical likelihood refuses it and names the likelihood to use instead."""
    model = nn.Linear(6, 1)
    batches = [(torch.randn(4, 6), torch.zeros(4, dtype=torch.long))]
    for kind in PER_SAMPLE_KINDS:
        with pytest.raises(FisherError, match=r"shape \[4, 1\]: one class.*'bernoulli'"):
            fisher_diagonal(model, batches, kind)
    with pytest.raises(FisherError, match=r"0/1 labels shaped like the logits \[4, 1\]"):
        fisher_diagonal(model, batches, "empirical", likelihood=BernoulliLikelihood())
    twos = [(torch.randn(4, 6), torch.full((4, 1), 2.0))]
    with pytest.raises(FisherError, match=r"must be 0 or 1; got values from 2 to 2"):
        fisher_diagonal(model, twos, "empirical", likelihood="bernoulli")


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
def test_one_output_per_sample_may_be_squeezed(likelihood: str) -> None:
    """A single-output model read as ``[N]`` (``out.squeeze(1)``, targets ``[N]``) has the
    Fisher of the same model read as ``[N, 1]``, for every kind and method."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    x, y = torch.randn(9, 6, dtype=torch.float64), torch.randint(0, 2, (9,)).double()
    batches = pairs(x, y)

    def squeezed(m: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
        return m(batch[0]).squeeze(1), batch[1]

    def column(m: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
        return m(batch[0]), batch[1][:, None]

    for kind in PER_SAMPLE_KINDS:
        expected = fisher_diagonal(model, batches, kind, likelihood, forward=column, method="loop")
        for method in ("hooks", "func", "loop"):
            got = fisher_diagonal(model, batches, kind, likelihood, forward=squeezed, method=method)
            assert_fisher_close(got, expected)


def test_masked_classes_cost_no_backward_pass() -> None:
    """Two classes with nonzero probability: rank 1, one backward pass."""
    probs = torch.tensor([[0.0, 0.5, 0.5], [0.0, 0.2, 0.8]])
    assert len(list(CategoricalLikelihood().exact_output_grads(probs.log()))) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_output_grads_are_a_rank_c_minus_1_square_root(dtype: torch.dtype) -> None:
    """sum_j v_j v_j^T = diag(p) - pp^T per sample with C - 1 vectors, also for confident
    samples, a class masked everywhere and one masked in some samples only."""
    logits = torch.randn(6, 5, dtype=dtype) * 4
    logits[0] = torch.tensor([30.0, 0.0, -30.0, 0.0, 0.0])  # p ~ e_0 in float32
    logits[:, 3] = -torch.inf  # masked everywhere
    logits[1:3, 0] = -torch.inf  # masked in two samples
    vs = list(CategoricalLikelihood().exact_output_grads(logits))
    assert len(vs) == 3  # 4 classes with probability, rank 3
    p = logits.softmax(1)
    got = sum(v[:, :, None] * v[:, None, :] for v in vs)
    expected = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    tol = 1e-6 if dtype == torch.float32 else 1e-15
    torch.testing.assert_close(got, expected, atol=tol, rtol=0)


class Bernoulli:
    """A user likelihood: one logit per sample, targets in {0., 1.}."""

    def log_prob(self, output: Tensor, target: Tensor) -> Tensor:
        return -F.binary_cross_entropy_with_logits(output[:, 0], target, reduction="none")

    def sample(self, output: Tensor, generator: torch.Generator) -> Tensor:
        return torch.bernoulli(torch.sigmoid(output[:, 0].detach()), generator=generator)

    def exact_output_grads(self, output: Tensor) -> Iterator[Tensor]:
        p = torch.sigmoid(output.detach())
        yield (p * (1 - p)).sqrt()


def test_user_likelihood_protocol() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    x = torch.randn(9, 6, dtype=torch.float64)
    batches = pairs(x, (torch.rand(9) > 0.5).double())
    assert isinstance(Bernoulli(), Likelihood)
    for kind in PER_SAMPLE_KINDS:
        reference = fisher_diagonal(model, batches, kind, Bernoulli(), method="loop")
        assert_fisher_close(fisher_diagonal(model, batches, kind, Bernoulli()), reference)
    # exact = mean_i E_y[g_i(y)^2] = mean_i [p_i g_i(1)^2 + (1 - p_i) g_i(0)^2]
    p = torch.sigmoid(model(x))[:, 0].detach()
    expected = {n: torch.zeros_like(q) for n, q in model.named_parameters()}
    for i in range(9):
        for label, weight in ((1.0, p[i]), (0.0, 1 - p[i])):
            one = [(x[i : i + 1], torch.full((1,), label, dtype=torch.float64))]
            for n, f in fisher_diagonal(model, one, "empirical", Bernoulli()).items():
                expected[n] += weight * f / 9
    assert_fisher_close(fisher_diagonal(model, batches, "exact", Bernoulli()), expected)


class Gain(nn.Module):
    """``x * gain``, with a rule registered in the test below."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gain


def test_a_registered_rule_is_used() -> None:
    calls = []

    @register_rule(Gain)
    def gain_rule(
        module: Gain, args: tuple[Any, ...], kwargs: dict[str, Any], grad_outputs: list[Tensor]
    ) -> dict[str, Tensor]:
        calls.append(module)
        return {"gain": sum((d * args[0]).square().sum(0) for d in grad_outputs)}

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), Gain(5), nn.Tanh(), nn.Linear(5, 4)).double()
    batches = pairs(torch.randn(9, 6, dtype=torch.float64), torch.randint(0, 4, (9,)))
    reference = fisher_diagonal(model, batches, method="loop")
    assert_fisher_close(fisher_diagonal(model, batches, method="hooks"), reference)
    assert calls == [model[1], model[1]]  # one call per batch
    mas = MAS(model, lam=1.0)
    mas.consolidate(batches)  # the rule takes no power: MAS uses the generic rule for Gain
    assert calls == [model[1], model[1]]
    assert_fisher_close(mas.importance, mas_by_loop(model, batches))


class SharedTwice(nn.Module):
    """The same Linear applied twice (weight sharing through a module call)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(6, 6)
        self.head = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.block(torch.tanh(self.block(x)))))


class Tied(nn.Module):
    """One parameter registered in two modules (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.encode = nn.Linear(6, 6)
        self.decode = nn.Linear(6, 6)
        self.decode.weight = self.encode.weight
        self.head = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.decode(torch.tanh(self.encode(x))))


class OutsideUse(nn.Module):
    """``proj``'s weight used functionally by the parent; ``proj`` itself is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)
        self.proj = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(torch.tanh(self.fc(x)), self.proj.weight)


@pytest.mark.parametrize("name", ["cnn", "groupnorm-conv1d", "embedding-layernorm"])
def test_rules_give_the_same_sums_one_sample_per_chunk(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Linear (3-D input) and conv rules materialise per-sample gradients in cache-sized
    chunks; with a budget of one byte every chunk holds one sample."""
    from ewc.fisher import _util

    case = CASES[name]
    model, batches = _setup(case)
    reference = fisher_diagonal(model, batches, method="loop")
    monkeypatch.setattr(_util, "CACHE_CHUNK_BYTES", 1)
    assert_fisher_close(fisher_diagonal(model, batches, method="hooks"), reference)


def test_a_broadcast_output_that_the_model_cannot_take_expanded_falls_back() -> None:
    """A model that needs the position embedding's single row (``view(T, D)``) fails once the
    hooks expand it to the batch: ``auto`` switches to ``func``, ``hooks`` names the module."""
    torch.manual_seed(0)
    model = Positional(squeeze=True).double()
    batches = _tokens()
    reference = fisher_diagonal(model, batches, "empirical", method="loop")
    assert_fisher_close(fisher_diagonal(model, batches, "empirical"), reference)
    with pytest.raises(FisherError, match=r"broadcast output of module 'position'.*'func'"):
        fisher_diagonal(model, batches, "empirical", method="hooks")


@pytest.mark.parametrize(
    ("make", "culprit"),
    [
        (SharedTwice, "'block'"),
        (Tied, "'encode.weight'"),
        (OutsideUse, "'proj.weight'"),
    ],
)
def test_hooks_detect_what_they_cannot_split(make: Callable[[], nn.Module], culprit: str) -> None:
    torch.manual_seed(0)
    model = make().double()
    batches = pairs(torch.randn(9, 6, dtype=torch.float64), torch.randint(0, 4, (9,)))
    reference = fisher_diagonal(model, batches, "empirical", method="loop")
    assert_fisher_close(fisher_diagonal(model, batches, "empirical"), reference)  # auto -> func
    with pytest.raises(FisherError, match=rf"{culprit}.*method='func'"):
        fisher_diagonal(model, batches, "empirical", method="hooks")


def mas_by_loop(
    model: nn.Module, batches: list[Any], forward: Callable[..., Any] | None = None
) -> dict[str, Tensor]:
    """MAS importance by hand: mean over samples of |∇θ ‖f(x)‖²|, one sample at a time."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    model.eval()
    for batch in batches:
        n = batch_size(batch)
        for i in range(n):
            one = take(batch, n, slice(i, i + 1))
            output = forward(model, one)[0] if forward else model(one[0])
            root = output.square().sum()
            grads = torch.autograd.grad(root, list(params.values()), allow_unused=True)
            for name, g in zip(params, grads, strict=True):
                if g is not None:
                    total[name] += g.abs()
        count += n
    model.train()
    return {name: t / count for name, t in total.items()}


MAS_CASES = [name for name in CASES if name != "masked-logits"]  # -inf outputs: infinite norm


@pytest.mark.parametrize("name", MAS_CASES)
def test_mas_importance_matches_a_per_sample_loop(name: str) -> None:
    case = CASES[name]
    model, batches = _setup(case)
    expected = mas_by_loop(model, batches, case.forward)
    assert all(float(e.abs().max()) > 0 for e in expected.values())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    for method in ("hooks", "func"):
        reg = MAS(model, lam=1.0, forward=case.forward, method=method)
        reg.consolidate(batches)
        assert_fisher_close({n: reg.importance[n] for n in trainable}, expected)


@pytest.mark.parametrize("make", [SharedTwice, Tied, OutsideUse])
def test_mas_falls_back_to_func_where_hooks_cannot_split(make: Callable[[], nn.Module]) -> None:
    torch.manual_seed(0)
    model = make().double()
    batches = pairs(torch.randn(9, 6, dtype=torch.float64), torch.randint(0, 4, (9,)))
    reg = MAS(model, lam=1.0)
    reg.consolidate(batches)
    assert_fisher_close(dict(reg.importance), mas_by_loop(model, batches))
    with pytest.raises(FisherError, match="method='func'"):
        MAS(model, lam=1.0, method="hooks").consolidate(batches)


class InPlaceAfterUse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = x * 2
        out = self.fc(h)
        h.zero_()
        return out


def test_hooks_refuse_inputs_changed_in_place_after_the_call() -> None:
    batches = pairs(torch.randn(9, 6), torch.randint(0, 4, (9,)))
    with pytest.raises(FisherError, match="modified in place"):
        fisher_diagonal(InPlaceAfterUse(), batches, "empirical", method="hooks")


class Recurrent(nn.Module):
    """Token ids -> embedding -> a recurrent layer -> the last step's logits."""

    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.rnn = cell(4, 5, num_layers=2, batch_first=True)
        self.head = nn.Linear(5, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(self.embed(x))[0][:, -1])


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
def test_models_torch_func_cannot_transform_fall_back_to_the_loop(cell: type[nn.Module]) -> None:
    """``vmap`` fails inside PyTorch's recurrent kernels: ``method="auto"`` computes the same
    Fisher as the per-sample loop, saying so once (not once per batch); ``"func"`` raises, naming
    the batch."""
    torch.manual_seed(0)
    model = Recurrent(cell).double()
    batches = pairs(torch.randint(0, 7, (9, 3)), torch.randint(0, 4, (9,)))
    reference = fisher_diagonal(model, batches, method="loop")
    with pytest.warns(UserWarning, match="one sample at a time") as caught:
        assert_fisher_close(fisher_diagonal(model, batches), reference)
    assert sum("one sample at a time" in str(w.message) for w in caught) == 1
    assert all(float(f.abs().max()) > 0 for f in reference.values())
    with pytest.raises(FisherError, match=r"batch 0: the model failed .*broadcast shape"):
        fisher_diagonal(model, batches, method="func")


def test_attention_gives_the_loops_fisher_without_functorch_warnings() -> None:
    """PyTorch's attention kernel has no ``vmap`` batching rule: functorch runs it sample by sample
    and warns about speed on every batch; the result is right and the warning is not shown."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(12, 3)).double()
    batches = pairs(torch.randn(9, 3, 4).double(), torch.randint(0, 3, (9,)))
    reference = fisher_diagonal(model, batches, method="loop")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_fisher_close(fisher_diagonal(model, batches), reference)


@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_token_logits_sum_the_log_likelihood_over_labelled_positions(kind: str) -> None:
    """Logits ``[N, T, C]`` with tags ``[N, T]``: a sample's log-likelihood is the sum over its
    labelled positions (``-100``: none), so the empirical Fisher squares the gradient of that sum
    and the exact one sums p_tc · (∇ log p_t(c))² over labelled positions and
    classes (the cross-position terms vanish in expectation). Checked against autograd, one
    sample, position and class at a time."""
    torch.manual_seed(0)
    model, batches = Tagger().double(), _tags()
    params = dict(model.named_parameters())
    want = {name: torch.zeros_like(p) for name, p in params.items()}
    for tokens, tags in batches:
        for i in range(len(tokens)):
            log_p = torch.log_softmax(model(tokens[i : i + 1])[0], dim=-1)  # [T, C]
            labelled = [t for t in range(tags.shape[1]) if int(tags[i, t]) != -100]
            if kind == "empirical":
                terms = [(1.0, sum(log_p[t, int(tags[i, t])] for t in labelled))]
            else:
                terms = [
                    (float(log_p[t, c].detach().exp()), log_p[t, c])
                    for t in labelled
                    for c in range(3)
                ]
            for weight, term in terms:
                grads = torch.autograd.grad(term, list(params.values()), retain_graph=True)
                for name, g in zip(params, grads, strict=True):
                    want[name] += weight * g.square() / 9
    assert_fisher_close(fisher_diagonal(model, batches, kind=kind), want)


@pytest.mark.parametrize("kind", PER_SAMPLE_KINDS)
def test_positions_without_labels_add_nothing(kind: str) -> None:
    """A batch whose tags are all ``-100`` has a zero Fisher for every kind (the sampled and
    predicted targets keep the padding), and a fully padded sample changes a deterministic
    kind's sum by nothing."""
    torch.manual_seed(0)
    model, ((tokens, tags),) = Tagger().double(), _tags()[:1]
    padded = torch.full_like(tags, -100)
    assert all(
        float(f.abs().max()) == 0 for f in fisher_diagonal(model, [(tokens, padded)], kind).values()
    )
    if kind != "sampled":
        with_pad = [(tokens, torch.cat([padded[:1], tags[1:]]))]
        without = [(tokens[1:], tags[1:])]
        n = len(tokens)
        got = fisher_diagonal(model, with_pad, kind)
        want = fisher_diagonal(model, without, kind)
        assert_fisher_close(
            {k: v * n for k, v in got.items()}, {k: v * (n - 1) for k, v in want.items()}
        )


@pytest.mark.parametrize("bad", ["x", 1.5, True])
def test_ignore_index_must_be_an_int(bad: object) -> None:
    with pytest.raises(FisherError, match="ignore_index must be an int"):
        CategoricalLikelihood(ignore_index=bad)  # type: ignore[arg-type]


def test_exact_kind_refuses_more_passes_than_a_language_model_can_afford() -> None:
    """``kind="exact"`` costs a backward pass per position and class: on a language model's
    logits it is refused before any pass, naming the kinds that cost one."""
    model = nn.Sequential(nn.Embedding(50, 4), nn.Linear(4, 50))
    batches = pairs(torch.randint(0, 50, (4, 300)), torch.randint(0, 50, (4, 300)), sizes=(4,))
    with pytest.raises(FisherError, match="kind='sampled'"):
        fisher_diagonal(model, batches, kind="exact")


def test_batched_kind() -> None:
    model, batches = _setup(CASES["mlp"])
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    singles = [(x[i : i + 1], y[i : i + 1]) for i in range(9)]
    empirical = fisher_diagonal(model, batches, "empirical")
    assert_fisher_close(fisher_diagonal(model, singles, "batched"), empirical)
    batched = fisher_diagonal(model, batches, "batched")
    assert not torch.allclose(batched["0.weight"], empirical["0.weight"], rtol=1e-2)
    # by hand: sum_b B_b * (mean-gradient of batch b)^2 / N
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for xb, yb in batches:
        loss = -F.cross_entropy(model(xb), yb)
        for (n, _), g in zip(
            model.named_parameters(),
            torch.autograd.grad(loss, list(model.parameters())),
            strict=True,
        ):
            expected[n] += len(xb) * g.square() / 9
    assert_fisher_close(batched, expected)


def test_sampled_is_reproducible_and_leaves_the_global_rng_alone() -> None:
    model, batches = _setup(CASES["cnn"])
    state = torch.get_rng_state()
    first = fisher_diagonal(model, batches, "sampled", seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    again = fisher_diagonal(model, batches, "sampled", seed=3)
    other = fisher_diagonal(model, batches, "sampled", seed=4)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.allclose(first[n], other[n]) for n in first)


def test_n_samples_uses_the_first_samples_and_stops_iterating() -> None:
    model, batches = _setup(CASES["mlp"])
    pulled = []

    def stream() -> Iterator[tuple[Tensor, Tensor]]:
        for b in [*batches, (None, None)]:  # the sentinel must never be pulled
            pulled.append(b)
            yield b

    x, y = batches[0][0], batches[0][1]
    head = fisher_diagonal(model, [(x[:3], y[:3])])
    assert_fisher_close(fisher_diagonal(model, stream(), n_samples=3), head)
    assert len(pulled) == 1
    pulled.clear()
    seven = fisher_diagonal(model, stream(), n_samples=7)
    assert len(pulled) == 2
    x2, y2 = batches[1]
    assert_fisher_close(seven, fisher_diagonal(model, [batches[0], (x2[:2], y2[:2])]))


def test_leaves_model_state_grads_and_modes_as_they_were() -> None:
    model, batches = _setup(CASES["batchnorm-dropout"])
    model.train()
    model[1].eval()  # a mix of modes, restored module by module
    modes = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    marker = torch.ones_like(model[0].bias)
    model[0].bias.grad = marker
    for kind in ("exact", "batched"):
        fisher = fisher_diagonal(model, batches, kind)
        assert [m.training for m in model.modules()] == modes
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # BN stats too
        assert model[0].bias.grad is marker and torch.equal(marker, torch.ones_like(marker))
        assert all(p.grad is None for n, p in model.named_parameters() if n != "0.bias")
        for n, p in model.named_parameters():
            assert fisher[n].shape == p.shape and fisher[n].dtype == p.dtype
            assert fisher[n].device == p.device and not fisher[n].requires_grad


def test_eval_mode_gives_deterministic_dropout_and_running_batchnorm() -> None:
    model, batches = _setup(CASES["batchnorm-dropout"])
    model.train()
    a = fisher_diagonal(model, batches, "empirical")
    b = fisher_diagonal(model, batches[::-1], "empirical")  # batch composition does not matter
    assert_fisher_close(a, b)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    n_in=st.integers(1, 5),
    hidden=st.integers(1, 5),
    n_out=st.integers(2, 4),
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    kind=st.sampled_from(PER_SAMPLE_KINDS),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_linear_hooks_equal_loop(
    n_in: int, hidden: int, n_out: int, sizes: list[int], kind: str, bias: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(n_in, hidden, bias=bias), nn.Tanh(), nn.Linear(hidden, n_out))
    model.double()
    x = torch.randn(sum(sizes), n_in, dtype=torch.float64)
    batches = pairs(x, torch.randint(0, n_out, (sum(sizes),)), tuple(sizes))
    reference = fisher_diagonal(model, batches, kind, seed=seed, method="loop")
    assert_fisher_close(fisher_diagonal(model, batches, kind, seed=seed, method="hooks"), reference)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    padding=st.integers(0, 2),
    groups=st.sampled_from([1, 2]),
    mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    two_d=st.booleans(),
)
def test_property_conv_hooks_equal_loop(
    kernel: int, stride: int, dilation: int, padding: int, groups: int, mode: Any, two_d: bool
) -> None:
    torch.manual_seed(kernel * 100 + stride * 10 + dilation)
    conv = (nn.Conv2d if two_d else nn.Conv1d)(
        2, 4, kernel, stride, padding, dilation, groups, padding_mode=mode
    )
    model = nn.Sequential(conv, nn.Flatten(), nn.LazyLinear(3)).double()
    x = torch.randn(5, 2, *((7, 6) if two_d else (7,)), dtype=torch.float64)
    model(x)  # materialise the lazy layer
    batches = pairs(x, torch.randint(0, 3, (5,)), (3, 2))
    reference = fisher_diagonal(model, batches, "empirical", method="loop")
    assert_fisher_close(fisher_diagonal(model, batches, "empirical", method="hooks"), reference)


# --- errors -------------------------------------------------------------------------------


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "fisher"}, r"kind='fisher' is not one of"),
        ({"method": "magic"}, r"method='magic' is not one of"),
        ({"likelihood": "poisson"}, r"likelihood='poisson' is not one of"),
        ({"likelihood": object(), "kind": "sampled"}, r"has no method sample\(\)"),
        ({"n_samples": 0}, r"n_samples must be a positive int"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(FisherError, match=message):
        fisher_diagonal(_mlp(), _vectors(), **kwargs)


def test_errors_are_value_errors_with_fixes() -> None:
    assert issubclass(FisherError, ValueError)
    with pytest.raises(FisherError, match="batches yielded no samples"):
        fisher_diagonal(_mlp(), [])
    frozen = _mlp().requires_grad_(False)
    with pytest.raises(FisherError, match="no parameters with requires_grad=True"):
        fisher_diagonal(frozen, _vectors())
    with pytest.raises(FisherError, match=r"not an \(inputs, targets\) pair.*forward="):
        fisher_diagonal(_mlp(), [{"x": torch.randn(2, 6)}])
    with pytest.raises(FisherError, match="sigma"):
        GaussianLikelihood(0.0)


def test_batch_mistakes_get_a_message_naming_the_fix() -> None:
    """One pair passed as ``batches``, three-item batches, a Dataset instead of a DataLoader, a
    dict or model-output object instead of logits: each named, with the fix."""
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 3])
    with pytest.raises(FisherError, match=r"one tensor of shape \[4, 6\].*\[\(x, y\)\]"):
        fisher_diagonal(_mlp(), (x, y))
    with pytest.raises(FisherError, match=r"a batch of 3 items.*batch\[0\]"):
        fisher_diagonal(_mlp(), [(x, y, y)])
    dataset = torch.utils.data.TensorDataset(x, y)
    with pytest.raises(FisherError, match=r"wrap it in DataLoader\(dataset"):
        fisher_diagonal(_mlp(), dataset)

    def as_dict(model: nn.Module, batch: Any) -> tuple[Any, Tensor]:
        return {"logits": model(batch[0])}, batch[1]

    for kind in ("exact", "batched"):
        with pytest.raises(FisherError, match=r"output is a dict, not a tensor.*\.logits"):
            fisher_diagonal(_mlp(), [(x, y)], kind, forward=as_dict)


@pytest.mark.parametrize("method", ["auto", "loop"])
def test_batches_of_another_dtype_than_the_model_are_named(method: str) -> None:
    """float32 batches into a float64 model: one FisherError naming both dtypes and the cast,
    with no warning about torch.func on the way."""
    model = _mlp().double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(FisherError, match=r"batch 0: .*float32 tensors.*float64.*\.to\("):
            fisher_diagonal(model, _vectors(), method=method)


@pytest.mark.parametrize("kind", ["empirical", "batched"])
def test_targets_out_of_range(kind: str) -> None:
    batches = [(torch.randn(3, 6), torch.tensor([0, 4, -1]))]
    with pytest.raises(FisherError, match=r"\[0, 4\).*n_classes=4.*min=-1, max=4"):
        fisher_diagonal(_mlp(), batches, kind)


def test_batchnorm_without_running_statistics_is_refused() -> None:
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4, track_running_stats=False))
    with pytest.raises(FisherError, match=r"BatchNorm '1' has no running statistics"):
        fisher_diagonal(model, _vectors())


def test_target_with_zero_probability() -> None:
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 5))
    batches = [(torch.randn(2, 6), torch.tensor([1, 3]))]  # class 3 is masked
    with pytest.raises(FisherError, match="zero probability"):
        fisher_diagonal(model, batches, "empirical", forward=_masked)


def test_non_finite_fisher_names_the_parameter() -> None:
    batches = [(torch.full((2, 6), 1e25), torch.tensor([0, 1]))]  # finite logits, a^2 overflows
    with pytest.raises(FisherError, match=r"parameter '0.weight'.*Lower the learning rate"):
        fisher_diagonal(_mlp(), batches, "empirical")
