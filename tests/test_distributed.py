"""torch.distributed: the Fisher all-reduced over ranks, and the runner under torchrun (CPU, gloo).

Each test starts ``torchrun --nproc_per_node 2`` as a subprocess (about 10 s each).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ewc

pytestmark = pytest.mark.distributed
HERE = Path(__file__).parent


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``torchrun --standalone --nproc_per_node 2 ARGS`` with one thread a process; what it
    printed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent / "src")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    done = subprocess.run(
        [*command, "--nproc_per_node", "2", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """What each of two ranks held after consolidating its own, unequal shard."""
    out = tmp_path_factory.mktemp("fisher")
    torchrun(str(HERE / "distributed" / "fisher_worker.py"), str(out), cwd=out)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_every_rank_gets_the_fisher_of_all_shards(ranks: list[dict], kind: str) -> None:
    """36 + 14 samples on two ranks give the Fisher of one process on all 50, on both ranks."""
    for r in ranks:
        assert_same(r["fisher"][kind], r["single"][kind])


def test_distributed_false_keeps_each_ranks_own_shard(ranks: list[dict]) -> None:
    local0, local1 = ranks[0]["local"], ranks[1]["local"]
    assert not torch.allclose(local0["0.weight"], local1["0.weight"])
    # The all-reduced mean is the sample-weighted mean of the two shards' means.
    mixed = (36 * local0["0.weight"] + 14 * local1["0.weight"]) / 50
    torch.testing.assert_close(mixed, ranks[0]["single"]["exact"]["0.weight"])


def test_regularizers_hold_the_same_penalty_on_every_rank(ranks: list[dict]) -> None:
    """EWC (given the DDP wrapper), MAS and K-FAC: the importance of all shards on every rank."""
    assert_same(ranks[0]["importance"], ranks[1]["importance"])
    assert_same(ranks[0]["importance"], ranks[0]["single"]["exact"])
    torch.testing.assert_close(ranks[0]["penalty"], ranks[1]["penalty"])
    assert float(ranks[0]["penalty"]) > 0
    for r in ranks:
        assert_same(r["mas"], r["mas_single"])
        assert_same(r["kfac"], r["kfac_single"])


def test_a_ddp_model_keeps_its_parameter_names(ranks: list[dict]) -> None:
    names = {"module." + n for n in ranks[0]["single"]["exact"]}
    assert set(ranks[0]["ddp_fisher"]) == names


def test_the_runner_trains_with_ddp_and_rank_0_writes_and_speaks(tmp_path: Path) -> None:
    """``torchrun -m ewc run``: the same accuracy matrix as one process on the same global
    batches (gradients averaged over the two shards of each batch), one results file, and the
    results and table printed once, by rank 0."""
    pytest.importorskip("sklearn")
    settings = dict(
        benchmark="permuted-digits", strategy="ewc", n_tasks=2, epochs=1.0, seed=0, lam=1e3
    )
    single = ewc.run(ewc.RunConfig(**settings))
    out = tmp_path / "ddp.json"
    flags = ["--benchmark", "permuted-digits", "--strategy", "ewc", "--tasks", "2"]
    flags += ["--epochs", "1", "--seed", "0", "--lam", "1e3", "--quiet", "--no-report"]
    done = torchrun("-m", "ewc", "run", *flags, "--out", str(out), cwd=tmp_path)
    assert done.stdout.count("results: ddp.json") == 1 and done.stdout.count("| ewc | 1 |") == 1
    result = json.loads(out.read_text())
    for row, expected in zip(result["accuracy_matrix"], single["accuracy_matrix"], strict=True):
        assert row == pytest.approx(expected, abs=0.01)  # float sums in another order
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.json"]  # no stray tmp files
