"""One registry of strategies: the runner, the command line and the configs derive from it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import ewc
import ewc.regularizers
from ewc.regularizers import REGULARIZERS, Regularizer, make_regularizer
from ewc.runner import GENERIC_LAM, STRATEGIES, STRATEGY_SETTINGS, RunConfig, resolve_config


def test_the_runner_offers_every_registered_regularizer() -> None:
    assert set(REGULARIZERS) >= {"ewc", "online-ewc", "si", "mas", "l2", "kfac"}
    assert ("naive", "joint", *REGULARIZERS) == STRATEGIES
    assert {n: s.generic_lam for n, s in REGULARIZERS.items()} == GENERIC_LAM
    for name, strategy in REGULARIZERS.items():
        for setting in strategy.settings:
            assert name in STRATEGY_SETTINGS[setting]


@pytest.mark.parametrize("name", list(REGULARIZERS))
def test_each_strategy_builds_by_name_and_follows_the_protocol(name: str) -> None:
    reg = make_regularizer(name, nn.Linear(3, 2), lam=1.0)
    assert isinstance(reg, Regularizer)


@pytest.mark.parametrize("name", list(REGULARIZERS))
def test_each_strategy_runs_in_the_runner(name: str) -> None:
    """Every registry entry is wired: its options come from the config, its data (if any) is
    fed with the runner's output masks, and λ falls back to its generic value."""
    pytest.importorskip("sklearn")
    torch.manual_seed(0)
    config = RunConfig(
        benchmark="split-digits", strategy=name, n_tasks=2, epochs=1.0, max_train_samples=60
    )
    assert resolve_config(config).lam is not None
    result = ewc.run(config)
    assert len(result["accuracy_matrix"]) == 2
    assert len(result["importance"]) == 1  # consolidated after the first task


def test_a_strategy_without_proximal_step_refuses_the_proximal_penalty() -> None:
    assert not REGULARIZERS["kfac"].proximal
    with pytest.raises(ValueError, match="penalty"):
        resolve_config(RunConfig(benchmark="split-digits", strategy="kfac", penalty="proximal"))
    sgd = resolve_config(RunConfig(benchmark="split-digits", strategy="kfac", optimizer="sgd"))
    assert sgd.penalty == "grad"


def test_bad_options_are_refused_before_any_data_is_loaded() -> None:
    """KFAC has no batched Fisher: refused by resolve_config, from the class's own check."""
    with pytest.raises(ValueError, match="KFAC needs fisher in"):
        resolve_config(RunConfig(benchmark="split-mnist", strategy="kfac", fisher="batched"))


TOY = '''"""A toy method: importance 2 everywhere."""

import torch

from ewc.regularizers.base import QuadraticRegularizer
from ewc.regularizers.registry import Strategy, register


class Toy(QuadraticRegularizer):
    def task_importance(self, batches):
        return {n: torch.full_like(p, 2.0) for n, p in zip(self._names, self._params)}


register(Strategy("toy", Toy, 1.0))
'''


def test_a_new_method_is_one_new_file_and_one_import_line(tmp_path: Path) -> None:
    """Copy the package, add ``regularizers/toy.py`` and one line to the package's
    ``__init__``: the runner, the command line and ``make_regularizer`` offer it, and a run
    trains with it; nothing else was edited."""
    pytest.importorskip("sklearn")
    package = tmp_path / "ewc"
    shutil.copytree(Path(ewc.__file__).parent, package)
    (package / "regularizers" / "toy.py").write_text(TOY)
    init = package / "regularizers" / "__init__.py"
    lines = init.read_text().splitlines(keepends=True)
    at = lines.index("# isort: on\n")
    init.write_text("".join([*lines[:at], "from ewc.regularizers.toy import Toy\n", *lines[at:]]))
    script = (
        "import ewc, ewc.cli\n"
        f"assert ewc.__file__.startswith({str(package)!r}), ewc.__file__\n"
        "from ewc.runner import STRATEGIES, RunConfig, run\n"
        "assert STRATEGIES[-1] == 'toy', STRATEGIES\n"
        "r = run(RunConfig(benchmark='split-digits', strategy='toy', n_tasks=2,\n"
        "                  max_train_samples=40, epochs=1.0))\n"
        "assert r['config']['lam'] == 1.0 and len(r['importance']) == 1\n"
        "ewc.cli.main(['run', '--strategy', 'toy', '--help'])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "toy" in done.stdout  # the --strategy choices list it


def test_every_method_module_is_imported_by_the_package_for_its_names() -> None:
    """The package's ``__init__`` imports each method module for the classes it exports (no
    import only for a registration's side effect), and each registered class is exported."""
    exported = [getattr(ewc.regularizers, name) for name in ewc.regularizers.__all__]
    for strategy in REGULARIZERS.values():
        assert strategy.build in exported, strategy.name
