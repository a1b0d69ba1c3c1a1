"""λ across models: choose EWC's λ on validation data for one model, reuse it unchanged on a model
with 4x the parameters and on a more confident one (trained longer), with the raw Fisher and
with each normalisation, and say how far the reused λ lands from each model's own best.

    python scripts/lambda_transfer.py --out docs/lambda-transfer.json

For each model x normalisation (none, ``"mean"``, ``"rewrite"``) x λ of a half-decade grid, EWC
is trained on the benchmark (default: permuted-digits, 2 tasks, its published protocol: SGD,
proximal penalty; 5 epochs a task for the base model) on every seed
with 10 % of each task's training data held out; the λ with the highest mean validation ACC over
the seeds is that model's best (test data are never read). The distance from the base model's
best λ is in half-decades (grid steps). The model's confidence (mean max-probability) and mean
Fisher on the first task come from the regularizer's own ``stats``, read from the run's
checkpoint after that task. One thread; the file is rewritten after every grid point, and
finished points are kept when rerun.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from ewc.results import atomic_write_text
from ewc.runner import RunConfig, run

#: name -> (MLP hidden widths, epochs multiplier). 230 units: 70,390 parameters against
#: 17,610 for 100 (4.0x) on 8x8 digits with 10 outputs.
MODELS: dict[str, tuple[tuple[int, ...], float]] = {
    "base": ((100, 100), 1.0),
    "4x parameters": ((230, 230), 1.0),
    "trained 4x longer": ((100, 100), 4.0),
}
NORMALIZE = {"raw": None, "mean": "mean", "rewrite": "rewrite"}
VAL_FRACTION = 0.1


def half_decades(lo: float, hi: float) -> list[float]:
    """The grid 10**(k/2) from ``lo`` to ``hi`` (powers of ten), rounded to 3 digits."""
    k0, k1 = round(2 * math.log10(lo)), round(2 * math.log10(hi))
    return [float(f"{10 ** (k / 2):.3g}") for k in range(k0, k1 + 1)]


def one_run(cfg: RunConfig) -> dict[str, Any]:
    """Validation ACC of ``cfg``, and the regularizer's stats after the first task."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "run.ckpt"
        try:
            acc = run(cfg, checkpoint=ckpt)["metrics"]["acc"]
        except ValueError as e:  # a penalty too stiff for the step: NaN weights
            return {"acc": None, "error": str(e)[:200]}
        stats = torch.load(ckpt, weights_only=True)["regularizer"]["stats"][0]
    conf = stats["confidence"] or {}
    return {
        "acc": acc,
        "max_prob": conf.get("max_prob"),
        "fisher_mean": stats["fisher_mean"],
        "unprotected": stats["unprotected"],
        "lam_half": stats["lam_half"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON file of every grid point")
    p.add_argument("--benchmark", default="permuted-digits")
    p.add_argument("--tasks", type=int, default=2)
    p.add_argument("--epochs", type=float, default=5.0, help="the base model's epochs a task")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    p.add_argument("--raw-grid", default="1e0,1e6", help="lo,hi of the raw λ grid")
    p.add_argument("--mean-grid", default="1e-2,1e4", help="lo,hi of the λ grid for 'mean'")
    p.add_argument("--rewrite-grid", default="1e-2,1e2", help="lo,hi of the λ grid for 'rewrite'")
    args = p.parse_args()
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    grids = {
        norm: half_decades(*map(float, getattr(args, f"{norm}_grid").split(",")))
        for norm in NORMALIZE
    }
    done: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    points = done.get("points", {})
    for model, (hidden, longer) in MODELS.items():
        # λ = 0 first: the same training as no penalty, and the first task's stats
        runs = [("none", 0.0)] + [(norm, lam) for norm in NORMALIZE for lam in grids[norm]]
        for norm, lam in runs:
            for seed in seeds:
                key = f"{model}|{norm}|{lam:g}|{seed}"
                if key in points:
                    continue
                cfg = RunConfig(
                    benchmark=args.benchmark,
                    scenario="domain",
                    n_tasks=args.tasks,
                    strategy="ewc",
                    hidden=hidden,
                    epochs=args.epochs * longer,
                    lam=lam,
                    normalize=NORMALIZE.get(norm),
                    seed=seed,
                    val_fraction=VAL_FRACTION,
                    evaluate_on="val",
                )
                points[key] = one_run(cfg)
                print(key, points[key], flush=True)
                summary = {"args": vars(args) | {"out": str(args.out)}, "points": points}
                atomic_write_text(args.out, json.dumps(summary, indent=1) + "\n")
    print(table(points, grids, seeds))


def table(points: dict[str, Any], grids: dict[str, list[float]], seeds: list[int]) -> str:
    """The Markdown table: per normalisation and model, its own best λ (the larger on a tie) and
    every λ within one point of it, and where the base model's best λ lands on it: half-decades
    away, and the validation ACC there against the model's own best and against λ = 0."""

    def mean_acc(model: str, norm: str, lam: float) -> float | None:
        accs = [points[f"{model}|{norm}|{lam:g}|{s}"]["acc"] for s in seeds]
        return None if None in accs else statistics.mean(accs)

    def first_task(model: str, field: str) -> float:
        return statistics.mean(points[f"{model}|none|0|{s}"][field] for s in seeds)

    rows = [
        "| Fisher | model | conf. (task 1) | mean F | λ½ | own best λ | within 1 pt of it | "
        "base's λ | half-decades off | val ACC at own best | at base's λ | at λ = 0 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for norm, grid in grids.items():
        scores = {m: {lam: mean_acc(m, norm, lam) for lam in grid} for m in MODELS}
        best = {
            m: max((a, lam) for lam, a in by_lam.items() if a is not None)
            for m, by_lam in scores.items()
        }
        base = best["base"][1]
        for model in MODELS:
            top, own = best[model]
            near = [f"{lam:g}" for lam, a in scores[model].items() if (a or 0) >= top - 0.01]
            at_base = scores[model][base]
            rows.append(
                f"| {norm} | {model} | {first_task(model, 'max_prob'):.3f} | "
                f"{first_task(model, 'fisher_mean'):.2e} | {first_task(model, 'lam_half'):.3g} | "
                f"{own:g} | {', '.join(near)} | {base:g} | "
                f"{abs(grid.index(own) - grid.index(base))} | {100 * top:.1f} | "
                f"{'diverged' if at_base is None else f'{100 * at_base:.1f}'} | "
                f"{100 * mean_acc(model, 'none', 0.0):.1f} |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
