"""Choose the default strengths of the offline digits benchmarks on validation data.

    python scripts/choose_defaults.py --out docs/defaults-sweep.json

For every digits benchmark x scenario x regularizer, each strength of a grid of decades is
trained on seeds 0, 1, 2 with 20 % of each task's training data held out; the strength with the
highest mean validation ACC over the seeds is chosen (test data are never used to choose). The
chosen strength and naive fine-tuning are then measured on test data, same seeds, so the table
(docs/defaults.md, from ``scripts/defaults_table.py``) can say where a regularizer cannot beat
naive. The file is rewritten after every cell, and finished cells are kept when rerun.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

import torch

from ewc.results import atomic_write_text
from ewc.runner import RunConfig, run

BENCHMARKS = ("split-digits", "permuted-digits")
SCENARIOS = ("task", "domain", "class")
SEEDS = (0, 1, 2)
VAL_FRACTION = 0.2
GRIDS: dict[str, tuple[float, ...]] = {
    "ewc": (1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7),
    "online-ewc": (1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7),
    "si": (1e-1, 1e0, 1e1, 1e2, 1e3, 1e4),
    "mas": (1e-3, 1e-2, 1e-1, 1e0, 1e1, 1e2),
    "l2": (1e-4, 1e-3, 1e-2, 1e-1, 1e0, 1e1, 1e2, 1e3),
    "kfac": (1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7),
}


_MEASURED: dict[tuple[str, bool], float | None] = {}


def mean_acc(config: RunConfig, validation: bool) -> float | None:
    """Mean ACC over :data:`SEEDS` (a fraction), on validation or test data; None if a run fails
    (a penalty too stiff for the step size). Measured once per config (naive recurs)."""
    key = (json.dumps(config.to_dict(), sort_keys=True), validation)
    if key not in _MEASURED:
        _MEASURED[key] = _mean_acc(config, validation)
    return _MEASURED[key]


def _mean_acc(config: RunConfig, validation: bool) -> float | None:
    split: dict[str, Any] = {"val_fraction": VAL_FRACTION, "evaluate_on": "val"}
    accs = []
    for seed in SEEDS:
        cfg = dataclasses.replace(config, seed=seed, **(split if validation else {}))
        try:
            accs.append(run(cfg)["metrics"]["acc"])
        except ValueError:
            return None
    return statistics.mean(accs)


def choose(benchmark: str, scenario: str, strategy: str) -> dict[str, Any]:
    """One cell: validation ACC per grid value, the choice, and test ACC of it and of naive."""
    base = RunConfig(benchmark=benchmark, scenario=scenario, strategy=strategy)
    val = {lam: mean_acc(dataclasses.replace(base, lam=lam), True) for lam in GRIDS[strategy]}
    finished = {lam: acc for lam, acc in val.items() if acc is not None}
    chosen = max(finished, key=lambda lam: finished[lam])
    naive = RunConfig(benchmark=benchmark, scenario=scenario, strategy="naive")
    return {
        "benchmark": benchmark,
        "scenario": scenario,
        "strategy": strategy,
        "grid": [{"lam": lam, "val_acc": acc} for lam, acc in val.items()],
        "chosen": chosen,
        "naive_val_acc": mean_acc(naive, True),
        "test_acc": mean_acc(dataclasses.replace(base, lam=chosen), False),
        "naive_test_acc": mean_acc(naive, False),
        "seeds": list(SEEDS),
        "val_fraction": VAL_FRACTION,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file of every cell")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cells = json.loads(args.out.read_text()) if args.out.exists() else []
    done = {(c["benchmark"], c["scenario"], c["strategy"]) for c in cells}
    for benchmark in BENCHMARKS:
        for scenario in SCENARIOS:
            for strategy in GRIDS:
                if (benchmark, scenario, strategy) in done:
                    continue
                cells.append(choose(benchmark, scenario, strategy))
                atomic_write_text(args.out, json.dumps(cells, indent=1) + "\n")
                c = cells[-1]
                print(
                    f"{benchmark} {scenario} {strategy}: lam {c['chosen']:g}, test ACC "
                    f"{100 * c['test_acc']:.2f} vs naive {100 * c['naive_test_acc']:.2f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
