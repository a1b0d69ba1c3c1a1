"""FSDP2 (``fully_shard``) under ``torchrun --nproc_per_node 2`` on the CPU (gloo): each rank holds
its shard of the Fisher and of the regularizer state, and gets what one process gets.

Two torchrun subprocesses (about 15 s each on two cores): the worker in
``tests/distributed/fsdp_worker.py``, and the runner with ``--parallel fsdp``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from test_distributed import torchrun
from torch import nn

import ewc

pytestmark = pytest.mark.distributed
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """The worker's folder and what each of its two ranks held."""
    out = tmp_path_factory.mktemp("fsdp")
    torchrun(str(HERE / "distributed" / "fsdp_worker.py"), str(out), cwd=out)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def concatenated(ranks: list[dict], key: str, *sub: str) -> dict[str, torch.Tensor]:
    """The two ranks' shards of each tensor, put back together along dim 0."""
    parts = [r[key] for r in ranks]
    for k in sub:
        parts = [p[k] for p in parts]
    return {n: torch.cat([p[n] for p in parts]) for n in parts[0]}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 1e-5):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=1e-9)


@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_fisher_shards_together_are_the_one_process_fisher(worker, kind: str) -> None:
    """24 + 16 samples on two ranks, uneven parameter shards (rows 3 + 2, 2 + 1): each rank
    holds its rows of the Fisher of all 40 samples."""
    _, ranks = worker
    single = ranks[0]["single"][kind]
    assert_same(concatenated(ranks, "shards", kind), single)
    for r, rows in zip(ranks, (3, 2), strict=True):  # each rank holds only its shard
        assert r["shards"][kind]["0.weight"].shape == (rows, 6)


def test_regularizer_state_is_sharded_and_complete(worker) -> None:
    _, ranks = worker
    assert_same(concatenated(ranks, "importance"), ranks[0]["single"]["exact"])
    assert_same(concatenated(ranks, "mas"), ranks[0]["mas_single"])
    assert ranks[0]["importance"]["2.weight"].shape == (2, 5)
    assert ranks[1]["importance"]["2.weight"].shape == (1, 5)


def test_normalised_fisher_and_its_scale_equal_one_process(worker) -> None:
    """normalize='rewrite' and the recorded scale (means, maxima, rewrite costs, λ½) are those
    of one process on all the data; the per-layer quantiles, which a shard cannot give, and the
    confidence, which would need a forward on every rank's probe, are left out."""
    _, ranks = worker
    assert_same(concatenated(ranks, "rewrite"), ranks[0]["rewrite_single"])
    for sharded, single in zip(ranks[0]["stats"], ranks[0]["stats_single"], strict=True):
        for key in ("normalizer", "fisher_mean", "fisher_max", "lam_half", "unprotected"):
            assert sharded[key] == pytest.approx(single[key], rel=1e-5), key
        assert sharded["rewrite"] == pytest.approx(single["rewrite"], rel=1e-5)
        for name, layer in sharded["layers"].items():
            assert set(layer) == {"mean", "max"}
            assert layer["mean"] == pytest.approx(single["layers"][name]["mean"], rel=1e-5)
            assert layer["max"] == pytest.approx(single["layers"][name]["max"], rel=1e-5)
        assert sharded["confidence"] is None and single["confidence"] is not None
    for mine, theirs in zip(ranks[0]["stats"], ranks[1]["stats"], strict=True):
        mine, theirs = dict(mine, probe_s=0.0), dict(theirs, probe_s=0.0)  # but timings
        assert mine == theirs  # every rank records the same numbers


def test_penalty_is_the_same_on_every_rank_and_equals_the_unsharded_one(worker) -> None:
    _, ranks = worker
    assert float(ranks[0]["penalty"]) > 0
    for r in ranks:
        torch.testing.assert_close(r["penalty"], ranks[0]["penalty_single"], rtol=1e-5, atol=0)
    assert float(ranks[0]["penalty"]) == float(ranks[1]["penalty"])


@pytest.mark.parametrize(
    "run", ["ewc/autograd", "ewc/grad", "online-ewc/grad", "mas/grad", "si/grad", "l2/proximal"]
)
def test_training_steps_match_ddp(worker, run: str) -> None:
    """Two tasks of SGD steps with the regularizer (consolidating in between), by each penalty
    path: the FSDP weights equal DDP's up to rounding."""
    _, ranks = worker
    ddp, fsdp = ranks[0]["runs"][run]
    start = ranks[0]["single"]["exact"]  # parameter names
    for name in start:
        torch.testing.assert_close(fsdp[name], ddp["module." + name], rtol=1e-5, atol=1e-7)
    assert not torch.equal(fsdp["0.weight"], ranks[0]["runs"]["l2/proximal"][1]["0.weight"]) or (
        run == "l2/proximal"
    )  # the strategies differ: the comparison is not vacuous


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP in one process
def test_sharded_checkpoint_resumes_on_two_ranks_and_on_one(worker) -> None:
    """``torch.distributed.checkpoint`` of the sharded state: reloaded on the two ranks, and here
    in one process (another world size) into an unsharded regularizer."""
    out, ranks = worker
    for r in ranks:
        assert float(r["penalty_resumed"]) == float(r["penalty"])
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    reg = ewc.EWC(model, lam=1.0)
    state = reg.state_dict()
    dcp.load(state, checkpoint_id=out / "ckpt")
    reg.load_state_dict(state)
    assert reg.lam == 10.0 and reg.n_tasks == 1
    assert_same(reg.importance, ranks[0]["single"]["exact"])


def test_full_state_dict_is_one_ordinary_file(worker) -> None:
    """Gathered on rank 0 into a plain file: an unsharded model gets the same penalty, and the
    two ranks loaded it back into their shards."""
    out, ranks = worker
    full = torch.load(out / "full.pt", weights_only=True)
    assert_same(full["importance"], ranks[0]["single"]["exact"])
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    with torch.no_grad():  # the worker's moved parameters: anchor + 0.1
        for name, p in model.named_parameters():
            p.copy_(full["anchor"][name] + 0.1)
    reg = ewc.EWC(model, lam=1.0)
    reg.load_state_dict(full)
    torch.testing.assert_close(reg.penalty(), ranks[0]["penalty"], rtol=1e-5, atol=0)
    for r in ranks:
        assert float(r["penalty_from_full"]) == float(r["penalty"])


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("built_before", "Build the regularizer after fully_shard"),
        ("sharded_after_consolidate", "Build the regularizer after fully_shard"),
        ("world_size", "sharded over 1 ranks for a model sharded over 2"),
        ("kfac", "Use diagonal EWC"),
        ("func", "method='func' is not supported on an FSDP"),
    ],
)
def test_bad_input_gets_one_clear_line(worker, case: str, words: str) -> None:
    for r in worker[1]:
        message = r["errors"][case]
        assert words in message and "\n" not in message


def test_the_runner_trains_with_fsdp_like_one_process(tmp_path: Path) -> None:
    """``torchrun -m ewc run --parallel fsdp``: the accuracy matrix of one process."""
    pytest.importorskip("sklearn")
    settings = dict(benchmark="split-digits", strategy="ewc", epochs=1.0, seed=0, lam=1e3)
    single = ewc.run(ewc.RunConfig(**settings))
    out = tmp_path / "fsdp.json"
    flags = ["--benchmark", "split-digits", "--strategy", "ewc", "--epochs", "1", "--seed", "0"]
    flags += ["--lam", "1e3", "--parallel", "fsdp", "--quiet", "--no-report"]
    torchrun("-m", "ewc", "run", *flags, "--out", str(out), cwd=tmp_path)
    result = json.loads(out.read_text())
    assert result["settings"]["parallel"] == "fsdp"
    for row, expected in zip(result["accuracy_matrix"], single["accuracy_matrix"], strict=True):
        assert row == pytest.approx(expected, abs=0.01)  # float sums in another order
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fsdp.json"]


def test_the_lightning_callback_under_fsdp2_equals_ddp(tmp_path: Path) -> None:
    """Two tasks under ``ModelParallelStrategy`` (``fully_shard`` in ``configure_model``) and
    under DDP, on the CPU: the regularizer holds each rank's rows only, and the weights and the
    penalty equal DDP's."""
    pytest.importorskip("lightning")
    torchrun(str(HERE / "distributed" / "lightning_fsdp_worker.py"), str(tmp_path), cwd=tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["fsdp"]["importance_rows"]["net.0.weight"] == 3
    assert ranks[1]["fsdp"]["importance_rows"]["net.0.weight"] == 2
    assert ranks[0]["ddp"]["importance_rows"]["net.0.weight"] == 5
    for r in ranks:
        fsdp, ddp = r["fsdp"], r["ddp"]
        assert fsdp["penalty"] > 0
        assert fsdp["penalty"] == pytest.approx(ddp["penalty"], rel=1e-5)
        assert_same(fsdp["weights"], ddp["weights"])
        assert_same(fsdp["importance"], ddp["importance"])
