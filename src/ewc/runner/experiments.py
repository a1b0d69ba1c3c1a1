"""Several runs: :func:`compare` (strategies × seeds on identical data) and :func:`sweep` (a
setting chosen on validation data, then a final run on the test data), each writing one results
file per run as it finishes, so that an interrupted experiment keeps and reuses what it finished.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ewc import checkpoint as checkpoints
from ewc import distributed
from ewc.config import ConfigError
from ewc.outputs import check_paths, hold
from ewc.results import (
    SWEEP_SCHEMA,
    OutputError,
    load_results,
    save_results,
    write_summary_csv,
)
from ewc.runner.config import (
    STRATEGIES,
    STRATEGY_SETTINGS,
    RunConfig,
    choice,
    resolve_config,
    unused_settings,
)
from ewc.runner.run import run, versions
from ewc.runner.task import DivergedError


def result_path(out_dir: Path, strategy: str, seed: int) -> Path:
    """Where :func:`compare` writes the results of one strategy and seed."""
    return out_dir / f"{strategy}-seed{seed}.json"


def compare(
    config: RunConfig,
    strategies: Sequence[str],
    seeds: Sequence[int | str],
    out_dir: str | Path,
    progress: bool = False,
    resume: bool = True,
    log_dir: str | os.PathLike[str] | None = None,
) -> list[dict[str, Any]]:
    """Run several strategies on identical seeds and data; write one results file per run as it
    finishes (so an interrupted comparison keeps what it finished) and ``summary.csv``; with
    ``log_dir``, each run logs its curves to ``log_dir/<strategy>-seed<seed>/`` (see :func:`run`).

    Every run's settings and the output folder are checked before the first run starts: each
    strategy and seed once, no setting that none of the strategies reads. A setting read by
    some of the strategies only (``gamma``: online-ewc) is left at its default for the others.
    With ``resume``, a run whose results file exists with the same config is read, not rerun.
    """
    configs = compare_configs(config, strategies, seeds)
    out = Path(out_dir)
    paths = [result_path(out, c.strategy, c.seed) for c in configs]
    logs = [_logs(log_dir, c) for c in configs]
    check_paths(
        [*_with_checkpoints(paths), out / "summary.csv"],
        [out, *(log for log in logs if log is not None)],
    )
    with hold(out):  # one command per output folder
        results = [
            run_and_save(c, path, progress, resume, log)
            for c, path, log in zip(configs, paths, logs, strict=True)
        ]
        write_summary_csv(results, out / "summary.csv")
    return results


def compare_configs(
    config: RunConfig, strategies: Sequence[str], seeds: Sequence[int | str]
) -> list[RunConfig]:
    """The resolved settings of each run of :func:`compare`, seed by seed, checked: each
    strategy and seed once, no setting that none of the strategies reads."""
    if not strategies or not seeds:
        raise ConfigError("compare needs at least one strategy and one seed")
    for s in strategies:
        choice("strategy", s, STRATEGIES)
    unused = unused_settings(config, strategies)
    if unused:
        raise ConfigError(f"{unused[0]}; remove it or add a strategy that uses it")
    configs = [
        resolve_config(dataclasses.replace(config, **_run_update(s, seed)))
        for seed in seeds
        for s in strategies
    ]
    runs = [(c.strategy, c.seed) for c in configs]
    twice = next((r for i, r in enumerate(runs) if r in runs[:i]), None)
    if twice is not None:
        raise ConfigError(
            f"strategy {twice[0]!r} with seed {twice[1]} is given twice; it would count as "
            "two seeds. List each strategy and each seed once."
        )
    return configs


def _run_update(strategy: str, seed: int | str) -> dict[str, Any]:
    """The fields of one run of :func:`compare`: its strategy and seed, and the defaults of the
    settings that ``strategy`` does not read (:data:`STRATEGY_SETTINGS`)."""
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    unread = {n: defaults[n] for n, users in STRATEGY_SETTINGS.items() if strategy not in users}
    return {**unread, "strategy": strategy, "seed": seed}


def _logs(log_dir: str | os.PathLike[str] | None, cfg: RunConfig) -> Path | None:
    """Where one run of a comparison logs its curves: ``log_dir/<strategy>-seed<seed>``."""
    return None if log_dir is None else Path(log_dir) / f"{cfg.strategy}-seed{cfg.seed}"


def run_and_save(
    cfg: RunConfig,
    path: str | Path,
    progress: bool = False,
    resume: bool = True,
    log_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """The results of ``cfg``: read from ``path`` (a results JSON) if they are there with this
    config and ``resume``, else run (logging to ``log_dir``, if given) and saved there. The run
    saves a checkpoint after each task next to ``path`` (:func:`ewc.checkpoint.checkpoint_path`;
    not under FSDP), resumes from it with ``resume``, and removes it once the results are saved.
    Reading results and resuming are each said in one line on stderr."""
    ckpt = checkpoints.checkpoint_path(path)
    check_paths([path, ckpt], [] if log_dir is None else [log_dir])
    with hold(path):  # one command per results file
        result = _load_matching(Path(path), cfg) if resume else None
        if result is not None:
            distributed.note(f"{path} holds this run's results: read, not rerun (--fresh reruns)")
        else:
            if not resume:
                checkpoints.remove_checkpoint(ckpt)
            # No in-run checkpoints under FSDP yet (the states are sharded over the ranks).
            sharded = cfg.parallel == "fsdp" and distributed.launched()
            checkpoint = None if sharded else ckpt
            result = run(cfg, progress=progress, log_dir=log_dir, checkpoint=checkpoint)
            save_results(result, path)
        checkpoints.remove_checkpoint(ckpt)
    return result


def _with_checkpoints(paths: list[Path]) -> list[Path]:
    """Results files and the checkpoints written beside them while their runs train."""
    return [*paths, *map(checkpoints.checkpoint_path, paths)]


def _load_matching(path: Path, cfg: RunConfig) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        previous = load_results(path)
    except ValueError:
        return None
    return previous if previous.get("config") == cfg.to_dict() else None


def _file_name(value: float) -> str:
    """``value`` in a file name: short (``1000``, ``0.001``) where that reads back exactly, else
    Python's shortest exact form, so two distinct values never share a file."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


#: The settings :func:`sweep` can choose: those that change what is learned.
SWEEPABLE = ("lam", "gamma", "xi", "lr", "epochs", "iterations", "batch_size", "fisher_samples")


def sweep_configs(
    config: RunConfig, grid: Sequence[Any], param: str = "lam", val_fraction: float = 0.1
) -> list[RunConfig]:
    """The resolved settings of each grid point of :func:`sweep` (on the validation split),
    checked with the final run's: a sweepable ``param``, each value once."""
    if param not in SWEEPABLE:
        raise ConfigError(f"cannot sweep {param!r}; choose one of {', '.join(SWEEPABLE)}")
    if not grid:
        raise ConfigError(f"the {param} grid is empty; give values such as 1e2,1e3,1e4")
    held_out = dataclasses.replace(config, val_fraction=val_fraction, evaluate_on="val")
    configs = [resolve_config(dataclasses.replace(held_out, **{param: v})) for v in grid]
    values = [getattr(c, param) for c in configs]
    twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
    if twice is not None:
        raise ConfigError(f"{param}={twice!r} is in the grid twice; list each value once")
    resolve_config(dataclasses.replace(config, **{param: values[0]}))  # the final run's settings
    return configs


def sweep(
    config: RunConfig,
    grid: Sequence[Any],
    out_dir: str | Path,
    param: str = "lam",
    val_fraction: float = 0.1,
    progress: bool = False,
    resume: bool = True,
) -> dict[str, Any]:
    """Choose ``param`` (λ by default) on a validation split held out of the training data, then
    rerun with the chosen value and report test accuracy. Never looks at test data to choose.

    Writes ``out_dir/sweep.json`` (schema ewc.sweep/1), ``out_dir/<param>=<value>.json`` per grid
    point (validation results; distinct values never share a file) and ``out_dir/final.json``
    (test results at the chosen value). Every grid point's settings and the output folder are
    checked before the first run. A grid point whose run fails is recorded with its ``error``
    (and ``"diverged": true`` for a run that diverged) and skipped. With ``resume``, a point
    whose results file exists with the same config is read, not rerun.
    """
    configs = sweep_configs(config, grid, param, val_fraction)
    values = [getattr(c, param) for c in configs]
    out = Path(out_dir)
    paths = [out / f"{param}={_file_name(value)}.json" for value in values]
    final_path = out / "final.json"
    check_paths([*_with_checkpoints([*paths, final_path]), out / "sweep.json"], [out])
    with hold(out):  # one command per output folder
        points: list[dict[str, Any]] = []
        for cfg, value, path in zip(configs, values, paths, strict=True):
            try:
                result = run_and_save(cfg, path, progress, resume)
            except (ConfigError, OutputError):  # a setting the data refuse, an output in use
                raise
            except DivergedError as e:  # a penalty too stiff for the step size, a step too large
                points.append({"value": value, "error": str(e), "diverged": True})
                continue
            except ValueError as e:
                points.append({"value": value, "error": str(e)})
                continue
            last = result["accuracy_matrix"][-1]
            points.append(
                {
                    "value": value,
                    "val_acc": result["metrics"]["acc"],
                    "val_old_acc": sum(last[:-1]) / max(len(last) - 1, 1),
                    "val_new_acc": last[-1],
                }
            )
        finished = [p for p in points if "error" not in p]
        if not finished:
            raise ConfigError(f"every {param} in the grid failed: {points[0]['error']}")
        chosen = max(finished, key=lambda p: p["val_acc"])["value"]
        final_cfg = resolve_config(dataclasses.replace(config, **{param: chosen}))
        run_and_save(final_cfg, final_path, progress, resume)
        summary = {
            "schema": SWEEP_SCHEMA,
            "param": param,
            "strategy": config.strategy,
            "benchmark": final_cfg.benchmark,
            "grid": values,
            "points": points,
            "chosen": chosen,
            "final": str(final_path),
            "versions": versions(),
        }
        save_results(summary, out / "sweep.json")
    return summary
