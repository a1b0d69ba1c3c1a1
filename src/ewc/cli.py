"""The ``ewc`` command line: ``ewc run | compare | sweep | demo | report``.

Every option can also come from a YAML or TOML file (``--config FILE``) whose keys are
:class:`ewc.training.RunConfig` fields; options given on the command line win. Bad input ends
with one line naming the problem and the fix, and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tomllib
import yaml

from ewc import __version__
from ewc.data.sources import DataNotFoundError
from ewc.results import atomic_write_text, load_results, save_results
from ewc.training import (
    FISHER_KINDS,
    STRATEGIES,
    ConfigError,
    RunConfig,
    compare,
    run,
    sweep,
)

DEMO_STRATEGIES = ("naive", "ewc")


# CLI flag -> RunConfig field, for the options shared by run, compare, sweep and demo.
_RUN_OPTIONS: dict[str, tuple[str, type, str]] = {
    "--benchmark": ("benchmark", str, "task stream, e.g. split-mnist, permuted-mnist"),
    "--scenario": ("scenario", str, "task | domain | class (default: the benchmark's)"),
    "--model": ("model", str, "mlp | cnn (default: the benchmark's)"),
    "--hidden": ("hidden", str, "MLP hidden widths, comma-separated, e.g. 400,400"),
    "--tasks": ("n_tasks", int, "number of tasks (permuted/rotated benchmarks)"),
    "--epochs": ("epochs", float, "passes over each task's training set"),
    "--iterations": ("iterations", int, "optimizer steps per task (overrides --epochs)"),
    "--batch-size": ("batch_size", int, "samples per optimizer step"),
    "--lr": ("lr", float, "learning rate"),
    "--optimizer": ("optimizer", str, "adam | sgd"),
    "--lam": ("lam", float, "regularization strength λ in (λ/2)·Σ Ω (θ-θ*)²"),
    "--gamma": ("gamma", float, "online EWC decay γ in (0, 1]"),
    "--xi": ("xi", float, "SI damping ξ"),
    "--fisher": ("fisher", str, f"Fisher kind: {' | '.join(FISHER_KINDS)}"),
    "--fisher-samples": ("fisher_samples", int, "samples per Fisher estimate (default: all)"),
    "--seed": ("seed", int, "random seed (model init, data order, permutations)"),
    "--data-dir": ("data_dir", str, "folder with MNIST-format files (else $EWC_DATA_DIR, cache)"),
    "--device": ("device", str, "cpu | cuda"),
    "--eval-every": ("eval_every", int, "optimizer steps between curve points"),
    "--max-train-samples": ("max_train_samples", int, "cap on training samples per task"),
    "--penalty": ("penalty", str, "grad (closed-form, fast) | autograd | proximal (stable)"),
}


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit code 2."""


def _add_run_options(p: argparse.ArgumentParser, out_help: str) -> None:
    for flag, (dest, typ, help_) in _RUN_OPTIONS.items():
        p.add_argument(flag, dest=dest, type=typ, default=None, help=help_)
    p.add_argument("--config", type=Path, help="YAML or TOML file of RunConfig fields")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-download", action="store_true", help="never download data")
    p.add_argument("--no-report", action="store_true", help="skip the HTML/Markdown report")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", type=Path, required=True, help=out_help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ewc",
        description="Elastic Weight Consolidation and continual-learning baselines. "
        "Train tasks in sequence, measure forgetting, compare strategies.",
        epilog="Example: ewc compare --benchmark split-mnist --strategies naive,ewc,si "
        "--seeds 0,1,2 --out runs/split",
    )
    parser.add_argument("--version", action="version", version=f"ewc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="train one strategy on a benchmark, write a results JSON")
    p.add_argument("--strategy", default=None, help=f"one of {', '.join(STRATEGIES)}")
    _add_run_options(p, "results file (.json); a report is written beside it")

    p = sub.add_parser("compare", help="several strategies on identical seeds and data")
    p.add_argument("--strategies", default="naive,ewc", help="comma-separated strategy names")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument("--fresh", action="store_true", help="rerun even where results exist")
    _add_run_options(p, "output folder: one JSON per run, summary.csv, summary.md, report")

    p = sub.add_parser("sweep", help="choose λ (or another field) on validation data")
    p.add_argument("--strategy", default=None, help=f"one of {', '.join(STRATEGIES)}")
    p.add_argument("--param", default="lam", help="RunConfig field to sweep (default: lam)")
    p.add_argument("--grid", required=True, help="comma-separated values, e.g. 1e2,1e3,1e4")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out training fraction")
    _add_run_options(p, "output folder: sweep.json, one JSON per grid point, final.json")

    p = sub.add_parser(
        "demo",
        help="the seed experiment (Fashion-MNIST -> MNIST) with and without EWC",
        description="Fashion-MNIST then MNIST with the seed's CNN, naive vs EWC. Without the "
        "data (and no network), runs the same comparison on the offline permuted-digits stream.",
    )
    p.add_argument("--fast", action="store_true", help="a quick version: fewer samples")
    p.add_argument("--data-dir", default=None, help="folder with MNIST-format files")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--no-download", action="store_true", help="never download data")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")

    p = sub.add_parser("report", help="HTML + Markdown report from results files")
    p.add_argument("results", nargs="+", type=Path, help="results JSON files (and a sweep.json)")
    p.add_argument("--out", type=Path, required=True, help="report file (.html)")
    return parser


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise UsageError(f"cannot read config file {str(path)!r}: {e.strerror}") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise UsageError(f"config file {str(path)!r} does not parse: {e}") from None
    if not isinstance(data, dict):
        raise UsageError(f"config file {str(path)!r} must hold a mapping of RunConfig fields")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _run_config(args: argparse.Namespace) -> RunConfig:
    values = _read_config_file(args.config) if args.config else {}
    for dest, _, _ in _RUN_OPTIONS.values():
        if getattr(args, dest) is not None:
            values[dest] = getattr(args, dest)
    if getattr(args, "strategy", None) is not None:
        values["strategy"] = args.strategy
    if isinstance(values.get("hidden"), str):
        values["hidden"] = _numbers(values["hidden"], int, "--hidden")
    if args.no_download:
        values["download"] = False
    return RunConfig.from_dict(values)


def _numbers(text: str, typ: type, flag: str) -> list[Any]:
    try:
        values = [typ(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated numbers, got {text!r}") from None
    if not values:
        raise UsageError(f"{flag} is empty; give comma-separated values, e.g. 1e2,1e3,1e4")
    return values


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of metrics (in %) per strategy: mean ± std over seeds."""
    from ewc.report import markdown_table, metrics_table

    return markdown_table(metrics_table(results))


def _finish(
    results: list[dict[str, Any]],
    out_dir: Path,
    args: argparse.Namespace,
    sweep_summary: dict[str, Any] | None = None,
) -> None:
    table = format_table(results)
    print(table)
    atomic_write_text(out_dir / "summary.md", table + "\n")
    if not getattr(args, "no_report", False):
        from ewc.report import write_report

        html, _ = write_report(results, out_dir / "report.html", sweep=sweep_summary)
        print(f"report: {html}")


def _cmd_run(args: argparse.Namespace) -> None:
    if args.out.suffix != ".json":
        raise UsageError(f"--out must name a .json file, got {str(args.out)!r}")
    result = run(_run_config(args), progress=not args.quiet)
    save_results(result, args.out)
    print(f"results: {args.out}")
    print(format_table([result]))
    if not args.no_report:
        from ewc.report import write_report

        html, _ = write_report([result], args.out.with_suffix(".html"))
        print(f"report: {html}")


def _cmd_compare(args: argparse.Namespace) -> None:
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    seeds = _numbers(args.seeds, int, "--seeds")
    results = compare(
        _run_config(args),
        strategies,
        seeds,
        args.out,
        progress=not args.quiet,
        resume=not args.fresh,
    )
    _finish(results, args.out, args)


def _cmd_sweep(args: argparse.Namespace) -> None:
    grid = _numbers(args.grid, float, "--grid")
    summary = sweep(
        _run_config(args),
        grid,
        args.out,
        param=args.param,
        val_fraction=args.val_fraction,
        progress=not args.quiet,
    )
    for p in summary["points"]:
        outcome = p["error"] if "error" in p else f"validation ACC {100 * p['val_acc']:.2f} %"
        print(f"{args.param}={p['value']:g}: {outcome}")
    print(f"chosen {args.param} = {summary['chosen']:g} (highest validation ACC)")
    _finish([load_results(summary["final"])], args.out, args, sweep_summary=summary)


def _cmd_demo(args: argparse.Namespace) -> None:
    base = RunConfig(
        benchmark="fashion-mnist-to-mnist",
        data_dir=args.data_dir,
        download=not args.no_download,
        max_train_samples=10000 if args.fast else None,
    )
    try:
        from ewc.data.streams import make_stream

        make_stream(base.benchmark, data_dir=base.data_dir, download=base.download)
    except DataNotFoundError as e:
        print(
            f"note: {e}\nnote: running the same comparison on the offline permuted-digits "
            "stream (scikit-learn's digits, 2 tasks, shared head) instead.",
            file=sys.stderr,
        )
        base = RunConfig(benchmark="permuted-digits", n_tasks=2, scenario="domain")
    print(f"demo: {base.benchmark}, strategies {', '.join(DEMO_STRATEGIES)}")
    results = compare(base, DEMO_STRATEGIES, [0], args.out, progress=not args.quiet, resume=False)
    _finish(results, args.out, args)


def _cmd_report(args: argparse.Namespace) -> None:
    from ewc.report import write_report

    loaded = [load_results(p) for p in args.results]
    sweeps = [r for r in loaded if r["schema"] == "ewc.sweep/1"]
    results = [r for r in loaded if r["schema"] != "ewc.sweep/1"]
    if not results:
        raise UsageError("give at least one run results file (not only sweep.json)")
    html, md = write_report(results, args.out, sweep=sweeps[0] if sweeps else None)
    print(f"report: {html}\nsummary: {md}")


COMMANDS = {
    "run": _cmd_run,
    "compare": _cmd_compare,
    "sweep": _cmd_sweep,
    "demo": _cmd_demo,
    "report": _cmd_report,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ewc`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        COMMANDS[args.command](args)
    except (UsageError, ConfigError, DataNotFoundError, FileNotFoundError, ValueError) as e:
        if os.environ.get("EWC_DEBUG"):
            raise
        message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"ewc {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ewc {args.command}: interrupted; finished runs are saved", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
