"""The ``ewc`` command line: ``ewc run | compare | sweep | demo | report | fisher``.

Every option can also come from a YAML or TOML file (``--config FILE``) whose keys are
:class:`ewc.runner.RunConfig` fields; options given on the command line win. Bad input ends
with one line naming the problem and the fix, and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import MISSING
from pathlib import Path
from typing import Any, NoReturn

from ewc import __version__
from ewc._optional import MissingExtraError, MissingExtraWarning, require
from ewc.checkpoint import checkpoint_path
from ewc.config import did_you_mean, read_config_file
from ewc.data.sources import DataNotFoundError, find_datasets
from ewc.data.streams import BENCHMARKS
from ewc.fisher import KINDS as FISHER_KINDS
from ewc.logger import CSV_NAME
from ewc.outputs import check_paths
from ewc.results import atomic_write_text, check_output, load_results
from ewc.runner import (
    DEFAULT_BENCHMARK,
    OPTIMIZERS,
    STRATEGIES,
    RunConfig,
    applicable_settings,
    compare,
    compare_configs,
    describe_protocol,
    resolve_config,
    run_and_save,
    sweep,
    sweep_configs,
)
from ewc.tables import markdown_table, metrics_table, setting_text, takeaway

DEMO_STRATEGIES = ("naive", "ewc")
DEMO_BENCHMARK = "fashion-mnist-to-mnist"
DEMO_FAST_SAMPLES = 10000  # training samples a task with --fast
#: The demo's offline stand-in for its benchmark when the data are missing: the same comparison
#: on scikit-learn's digits, the second task with its pixels permuted, one shared head. λ was
#: chosen on validation for these two tasks (docs/results.md), not the 5-task benchmark's default.
DEMO_STAND_IN: dict[str, Any] = dict(
    benchmark="permuted-digits", n_tasks=2, scenario="domain", lam=1e4
)


# CLI flag -> (RunConfig field, help), for the options shared by run, compare and sweep. Values
# stay strings here: RunConfig coerces and checks them, as it does a config file's values. Each
# help says the value an unset option takes: the field's default (added by _add_run_options) or,
# for fields without one, the benchmark's protocol (listed in the commands' epilog).
_PROTOCOL = "default: the benchmark's protocol, below"
_RUN_OPTIONS: dict[str, tuple[str, str]] = {
    "--benchmark": (
        "benchmark",
        f"task stream: {', '.join(BENCHMARKS)} (default: {DEFAULT_BENCHMARK})",
    ),
    "--scenario": ("scenario", f"task | domain | class ({_PROTOCOL})"),
    "--model": ("model", f"mlp | cnn ({_PROTOCOL})"),
    "--hidden": ("hidden", f"MLP hidden widths, comma-separated, e.g. 400,400 ({_PROTOCOL})"),
    "--tasks": ("n_tasks", "number of tasks (permuted/rotated; default: the benchmark's)"),
    "--epochs": ("epochs", f"passes over each task's training set ({_PROTOCOL})"),
    "--iterations": ("iterations", "optimizer steps per task, instead of --epochs"),
    "--batch-size": ("batch_size", f"samples per optimizer step ({_PROTOCOL})"),
    "--lr": ("lr", f"learning rate ({_PROTOCOL})"),
    "--optimizer": ("optimizer", f"{' | '.join(OPTIMIZERS)} ({_PROTOCOL})"),
    "--lam": (
        "lam",
        "regularization strength λ in (λ/2)·Σ Ω (θ-θ*)² (default: chosen on validation data per "
        "benchmark, scenario and strategy: docs/defaults.md)",
    ),
    "--gamma": ("gamma", "online EWC decay γ in (0, 1]"),
    "--xi": ("xi", "SI damping ξ"),
    "--fisher": ("fisher", f"Fisher kind: {' | '.join(FISHER_KINDS)}"),
    "--fisher-samples": ("fisher_samples", "samples per Fisher estimate (default: all)"),
    "--normalize": ("normalize", "EWC's Fisher: mean | max | rewrite (λ½ = 1; default: raw)"),
    "--seed": ("seed", "random seed (model init, data order, permutations)"),
    "--data-dir": ("data_dir", "folder with MNIST-format files (else $EWC_DATA_DIR, cache)"),
    "--device": ("device", "cpu | cuda"),
    "--eval-every": ("eval_every", "optimizer steps between curve points (default: ~10 a task)"),
    "--max-train-samples": ("max_train_samples", "cap on training samples per task (default: all)"),
    "--penalty": (
        "penalty",
        "grad (closed-form, fast) | autograd | proximal (stable) (default: proximal with sgd, "
        "else grad)",
    ),
    "--parallel": ("parallel", "under torchrun: ddp | fsdp (sharded model and regularizer state)"),
}
#: The defaults of the fields that have one (``seed``: 0), said in the help of their option.
_FIELD_DEFAULTS = {
    f.name: f.default for f in dataclasses.fields(RunConfig) if f.default not in (None, MISSING)
}


_STRATEGY_HELP = f"one of {', '.join(STRATEGIES)} (default: {_FIELD_DEFAULTS['strategy']})"


def _protocols_epilog() -> str:
    """The commands' epilog: what the unset options take on each benchmark."""
    width = max(map(len, BENCHMARKS))
    lines = [f"  {name:{width}}  {describe_protocol(name)}" for name in BENCHMARKS]
    return "benchmark protocols (what unset options take):\n" + "\n".join(lines)


class UsageError(Exception):
    """Bad command-line input: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``ewc run: error: ...``), exit code 2."""

    def error(self, message: str) -> NoReturn:
        typo = re.search(r"invalid choice: '?([^' ]*)'? \(choose from (.*)\)", message)
        if typo:  # a mistyped command (or choice): name the closest
            choices = [c.strip(" '") for c in typo.group(2).split(",")]
            message += did_you_mean(typo.group(1), choices)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _CommandParser(_Parser):
    """A command's parser: an unknown option is an error of the command (``ewc run: error:
    ...``, pointing to ``ewc run --help``, not ``ewc --help``), and every error names the
    options closest to the unknown ones given (``--stratgy``: ``--strategy``)."""

    _argv: Sequence[str] = ()

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._argv = list(args or ())
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras

    def error(self, message: str) -> NoReturn:
        options = [option for action in self._actions for option in action.option_strings]
        given = [arg.split("=")[0] for arg in self._argv if arg.startswith("--")]
        guesses = {
            guess
            for flag in given
            if flag not in options
            for guess in difflib.get_close_matches(flag, options, n=1)
        }
        hint = f"; did you mean {' or '.join(sorted(guesses))}?" if guesses else ""
        super().error(message + hint)


#: Options that take one value -> the option of another command (or this one) that takes several.
_SEVERAL = {
    "--seed": ("--seeds", "compare"),
    "--strategy": ("--strategies", "compare"),
    "--lam": ("--grid", "sweep"),
}


def _check_single_values(args: argparse.Namespace) -> None:
    """A comma-separated list given to an option that takes one value: name the one that takes
    several (``compare --seed 0,1``: ``--seeds``)."""
    for flag, (several, command) in _SEVERAL.items():
        value = getattr(args, flag.removeprefix("--"), None)
        if isinstance(value, str) and "," in value:
            where = several if args.command == command else f"ewc {command} {several}"
            raise UsageError(f"{flag} takes one value, got {value!r}; for several: {where} {value}")


def _path(text: str) -> Path:
    """argparse type of a path option: an empty value is refused, not read as ``.``."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty value")
    return Path(text)


def _threads(text: str) -> int:
    """argparse type of ``--threads``: an integer from 1 to the number of CPUs."""
    cpus = os.cpu_count() or 1
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= cpus:
        raise argparse.ArgumentTypeError(f"expected an integer from 1 to {cpus}, got {text!r}")
    return value


def _add_run_options(p: argparse.ArgumentParser, out_help: str) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter  # the epilog's table as it is
    p.epilog = _protocols_epilog()
    for flag, (dest, help_) in _RUN_OPTIONS.items():
        if dest in _FIELD_DEFAULTS:
            help_ += f" (default: {setting_text(_FIELD_DEFAULTS[dest])})"
        p.add_argument(flag, dest=dest, default=None, help=help_)
    p.add_argument("--config", type=_path, help="YAML or TOML file of RunConfig fields")
    p.add_argument("--threads", type=_threads, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-download", action="store_true", help="never download data")
    p.add_argument("--no-report", action="store_true", help="skip the HTML/Markdown report")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", type=_path, required=True, help=out_help)


def _add_log_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-dir",
        type=_path,
        help="write loss, penalty and accuracy there while training runs: scalars.csv and, "
        "with the tensorboard extra, TensorBoard event files (one subfolder per run for "
        "compare and demo)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ewc",
        description="Elastic Weight Consolidation and continual-learning baselines. "
        "Train tasks in sequence, measure forgetting, compare strategies.",
        epilog="Example: ewc compare --benchmark split-mnist --strategies naive,ewc,si "
        "--seeds 0,1,2 --out runs/split",
    )
    parser.add_argument("--version", action="version", version=f"ewc {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_CommandParser
    )

    p = sub.add_parser("run", help="train one strategy on a benchmark, write a results JSON")
    p.add_argument("--strategy", default=None, help=_STRATEGY_HELP)
    p.add_argument("--fresh", action="store_true", help="rerun even where results exist")
    _add_run_options(p, "results file (.json); a report is written beside it")
    _add_log_dir(p)

    p = sub.add_parser("compare", help="several strategies on identical seeds and data")
    p.add_argument(
        "--strategies",
        help="comma-separated strategy names (default: the config's strategy, else naive,ewc)",
    )
    p.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1,2 (default: the config's)")
    p.add_argument("--fresh", action="store_true", help="rerun even where results exist")
    _add_run_options(p, "output folder: one JSON per run, summary.csv, summary.md, report")
    _add_log_dir(p)

    p = sub.add_parser("sweep", help="choose λ (or another field) on validation data")
    p.add_argument("--strategy", default=None, help=_STRATEGY_HELP)
    p.add_argument("--param", default="lam", help="RunConfig field to sweep (default: lam)")
    p.add_argument("--grid", required=True, help="comma-separated values, e.g. 1e2,1e3,1e4")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out training fraction")
    p.add_argument("--fresh", action="store_true", help="rerun even where results exist")
    _add_run_options(p, "output folder: sweep.json, one JSON per grid point, final.json")

    p = sub.add_parser(
        "demo",
        help="the seed experiment (Fashion-MNIST -> MNIST) with and without EWC",
        description="Fashion-MNIST then MNIST with the seed's CNN, naive vs EWC. Without the "
        "data (and no network), runs the same comparison on the offline permuted-digits stream.",
    )
    p.add_argument(
        "--fast",
        action="store_true",
        help=f"a quick version: {DEMO_FAST_SAMPLES:,} training samples a task instead of all "
        "(60,000); its report says so",
    )
    p.add_argument("--data-dir", default=None, help="folder with MNIST-format files")
    p.add_argument("--threads", type=_threads, help="torch CPU threads")
    p.add_argument("--no-download", action="store_true", help="never download data")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--out", type=_path, default=Path("runs/demo"), help="output folder (default: runs/demo)"
    )
    _add_log_dir(p)

    p = sub.add_parser("report", help="HTML + Markdown report from results files")
    p.add_argument("results", nargs="+", type=_path, help="results JSON files (and a sweep.json)")
    p.add_argument("--out", type=_path, required=True, help="report file (.html)")
    _add_fisher_parser(sub)
    return parser


def _positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def _add_fisher_parser(sub: Any) -> None:
    p = sub.add_parser(
        "fisher",
        help="the Fisher of a Hugging Face model on a text file, as an importance folder",
        description="Compute the diagonal Fisher of a local Hugging Face model folder (causal LM "
        "or sequence classifier, or a PEFT adapter folder) on a .txt or .jsonl file, once, and "
        "write it as an importance folder (importance.safetensors + importance.json) that "
        "EWC.from_pretrained and the trainer callbacks' start_from read.",
        epilog="Example: ewc fisher --model models/base --data general.txt --out fisher/base",
    )
    p.add_argument("--model", type=_path, required=True, help="model folder (save_pretrained)")
    p.add_argument("--data", type=_path, required=True, help=".txt (a sample a line) or .jsonl")
    p.add_argument("--out", type=_path, required=True, help="output folder")
    p.add_argument(
        "--kind",
        choices=FISHER_KINDS,
        help="Fisher kind (default: sampled for a causal LM, exact for a classifier)",
    )
    p.add_argument("--samples", type=_positive, help="use the first N samples (default: all)")
    p.add_argument("--max-length", type=_positive, default=256, help="tokens per sample at most")
    p.add_argument("--batch-size", type=_positive, default=8, help="samples per pass")
    p.add_argument("--text-field", default="text", help="the text's field in a .jsonl file")
    p.add_argument("--label-field", help="a classifier's label field in a .jsonl file")
    p.add_argument(
        "--paragraphs", action="store_true", help=".txt: a sample per blank-line-separated block"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled labels")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--threads", type=_threads, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _run_values(args: argparse.Namespace) -> dict[str, Any]:
    """The run settings from ``--config`` and the flags, unchecked; flags win, and a training
    length on the command line (``--epochs`` or ``--iterations``) replaces the file's."""
    values = read_config_file(args.config) if args.config else {}
    flags = {d: getattr(args, d) for d, _ in _RUN_OPTIONS.values() if getattr(args, d) is not None}
    if flags.keys() & {"epochs", "iterations"}:
        values.pop("epochs", None)
        values.pop("iterations", None)
    values.update(flags)
    if getattr(args, "strategy", None) is not None:
        values["strategy"] = args.strategy
    if args.no_download:
        values["download"] = False
    return values


def _run_config(args: argparse.Namespace) -> RunConfig:
    """The checked and resolved run settings (:func:`ewc.runner.resolve_config`)."""
    return resolve_config(RunConfig.from_dict(_run_values(args)))


def _announce(
    command: str, configs: Sequence[RunConfig], args: argparse.Namespace, varied: str
) -> None:
    """Say what will run, before it runs: each strategy with every setting it takes (but the
    ``varied`` one, said in ``command``), and the benchmark or strategy taken by default, not
    given (nothing hidden)."""
    given = _run_values(args)
    benchmark = f"{configs[0].benchmark}{_default_mark('benchmark', given)}"
    for cfg in configs:
        mark = "" if len(configs) > 1 else _default_mark("strategy", given)
        settings = applicable_settings(cfg)
        shown = ", ".join(
            f"{k} {setting_text(v)}"
            for k, v in settings.items()
            if k not in ("benchmark", "strategy", "extra", varied)
        )
        print(f"{command}: {cfg.strategy}{mark} on {benchmark}: {shown}")


def _default_mark(field: str, values: Mapping[str, Any]) -> str:
    """`` (default; --field chooses)`` when ``field`` was given by neither flag nor file."""
    return "" if field in values else f" (default; --{field} chooses)"


def _given(flag: str | None, default: Any) -> str:
    """A flag's value if it was given (an empty one too: :func:`_items` refuses it), else the
    default."""
    return str(default) if flag is None else flag


def _items(text: str, flag: str) -> list[str]:
    """The comma-separated items of a flag's value; RunConfig checks each. An empty value or
    item is refused, never read as the default."""
    items = [v.strip() for v in text.split(",")]
    if not all(items):
        raise UsageError(
            f"{flag} is empty or has an empty item ({text!r}); give comma-separated values"
        )
    return items


def _check_outputs(
    args: argparse.Namespace, paths: Sequence[Path], folders: Sequence[Path] = ()
) -> None:
    """Refuse unwritable or clashing outputs (``paths``, ``folders`` and ``--log-dir``), or
    outputs that are inputs, before any work is done (the runs then hold their outputs' locks:
    :func:`ewc.outputs.hold`)."""
    inputs = [args.config] if getattr(args, "config", None) else []
    logs = [args.log_dir] if getattr(args, "log_dir", None) is not None else []
    check_paths(paths, [*folders, *logs], inputs=inputs)


def _check_out_folder(args: argparse.Namespace) -> None:
    """Check the output folder, and the summary and report files ``_finish`` writes there."""
    names = ["summary.md"] + (
        [] if getattr(args, "no_report", False) else ["report.html", "report.md"]
    )
    _check_outputs(args, [args.out / name for name in names], folders=[args.out])


def _shown(path: Path) -> str:
    """``path`` as the user can open it from where they stand: relative to the working folder
    when it lies below it, else absolute (``scripts/demo.sh`` passes an absolute ``--out``)."""
    absolute = Path(os.path.abspath(path))
    return (
        str(absolute.relative_to(Path.cwd()))
        if absolute.is_relative_to(Path.cwd())
        else str(absolute)
    )


def format_table(results: Sequence[dict[str, Any]]) -> str:
    """A Markdown table of metrics (in %) per strategy: mean ± std over seeds."""
    return markdown_table(metrics_table(results))


def _print_results(results: Sequence[dict[str, Any]]) -> None:
    """The metrics table, then the result in one sentence (:func:`ewc.tables.takeaway`)."""
    print(format_table(results))
    print(takeaway(results))


def _finish(
    results: list[dict[str, Any]],
    out_dir: Path,
    args: argparse.Namespace,
    sweep_summary: dict[str, Any] | None = None,
) -> None:
    _print_results(results)
    atomic_write_text(out_dir / "summary.md", format_table(results) + "\n")
    if not getattr(args, "no_report", False):
        from ewc.report import write_report

        html, _ = write_report(results, out_dir / "report.html", sweep=sweep_summary)
        print(f"report: {_shown(html)}")


def _cmd_run(args: argparse.Namespace) -> None:
    if args.out.suffix != ".json":
        raise UsageError(f"--out must name a .json file, got {str(args.out)!r}")
    config = _run_config(args)
    reports = [] if args.no_report else [args.out.with_suffix(".html"), args.out.with_suffix(".md")]
    _check_outputs(args, [args.out, checkpoint_path(args.out), *reports])
    _announce("run", [config], args, varied="")
    progress, resume = not args.quiet, not args.fresh
    result = run_and_save(config, args.out, progress, resume, log_dir=args.log_dir)
    print(f"results: {_shown(args.out)}")
    _print_results([result])
    if not args.no_report:
        from ewc.report import write_report

        html, _ = write_report([result], args.out.with_suffix(".html"))
        print(f"report: {_shown(html)}")


def _cmd_compare(args: argparse.Namespace) -> None:
    values = _run_values(args)  # the file's strategy and seed are the defaults of the flags
    strategies = _items(
        _given(args.strategies, values.get("strategy", "naive,ewc")), "--strategies"
    )
    seeds = _items(_given(args.seeds, values.get("seed", 0)), "--seeds")
    base = RunConfig.from_dict(values)
    configs = compare_configs(base, strategies, seeds)[: len(strategies)]  # the first seed's
    _check_out_folder(args)
    _announce(f"compare (seeds {','.join(seeds)})", configs, args, varied="seed")
    results = compare(
        base,
        strategies,
        seeds,
        args.out,
        progress=not args.quiet,
        resume=not args.fresh,
        log_dir=args.log_dir,
    )
    _finish(results, args.out, args)


def _cmd_sweep(args: argparse.Namespace) -> None:
    grid = _items(args.grid, "--grid")
    config = _run_config(args)
    first = sweep_configs(config, grid, args.param, args.val_fraction)[0]
    _check_out_folder(args)
    _announce(f"sweep ({args.param} {','.join(grid)})", [first], args, varied=args.param)
    summary = sweep(
        config,
        grid,
        args.out,
        param=args.param,
        val_fraction=args.val_fraction,
        progress=not args.quiet,
        resume=not args.fresh,
    )
    for p in summary["points"]:
        outcome = p["error"] if "error" in p else f"validation ACC {100 * p['val_acc']:.2f} %"
        print(f"{args.param}={p['value']:g}: {'DIVERGED: ' if p.get('diverged') else ''}{outcome}")
    diverged = [f"{p['value']:g}" for p in summary["points"] if p.get("diverged")]
    if diverged:
        print(
            f"{len(diverged)} of {len(summary['points'])} points diverged ({args.param}="
            f"{', '.join(diverged)}): chosen among the others"
        )
    print(f"chosen {args.param} = {summary['chosen']:g} (highest validation ACC)")
    _finish([load_results(summary["final"])], args.out, args, sweep_summary=summary)


def _demo_config(args: argparse.Namespace) -> RunConfig:
    """The seed experiment; without its data, the offline stand-in, labelled as one in its config
    (``extra["stand_in"]``: what it stands in for and why), which results and reports show."""
    try:
        find_datasets(("fashion-mnist", "mnist"), args.data_dir, download=not args.no_download)
    except DataNotFoundError as e:
        fetch = "downloads are off (--no-download)" if args.no_download else "the download failed"
        reason = f"the {' and '.join(e.missing)} files were not found and {fetch}"
        try:  # the stand-in's extra, named before the notes on the data
            require("sklearn", "digits", "pass --data-dir DIR, a folder with the data files")
        except MissingExtraError as missing:
            raise MissingExtraError(f"{reason}; the offline stand-in: {missing}") from None
        print(f"note: {e}", file=sys.stderr)
        stand_in = {"for": DEMO_BENCHMARK, "reason": reason}
        return RunConfig(**DEMO_STAND_IN, extra={"stand_in": stand_in})
    return RunConfig(
        benchmark=DEMO_BENCHMARK,
        data_dir=args.data_dir,
        download=not args.no_download,
        max_train_samples=DEMO_FAST_SAMPLES if args.fast else None,
    )


def _demo_eta(base: RunConfig, n_train: int, n_test: int = 10000) -> float:
    """Seconds the seed experiment should take here, both strategies: its training steps,
    evaluated samples and Fisher samples, each priced by timing its model once on random data
    (a training step, a forward of 256 samples, the exact Fisher of 128; a few seconds).
    ``n_train`` / ``n_test``: samples per task (10,000 test images in both datasets)."""
    import time

    import torch
    from torch.nn import functional as F

    from ewc.fisher import fisher_diagonal
    from ewc.models import build_model
    from ewc.runner import evaluate
    from ewc.runner.task import n_steps

    cfg = resolve_config(dataclasses.replace(base, strategy="ewc"))
    assert cfg.batch_size is not None and cfg.fisher_samples is not None
    model = build_model(str(cfg.model), (1, 28, 28), 10)
    optimizer = torch.optim.Adam(model.parameters())
    x, y = torch.rand(cfg.batch_size, 1, 28, 28), torch.randint(0, 10, (cfg.batch_size,))

    def seconds(fn: Any) -> float:
        fn()  # warm-up
        tic = time.perf_counter()
        fn()
        return time.perf_counter() - tic

    def step() -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    per_step = seconds(step)
    per_eval = seconds(lambda: evaluate(model, x[:256], y[:256])) / len(x[:256])
    per_fisher = seconds(lambda: fisher_diagonal(model, [(x[:128], y[:128])])) / len(x[:128])
    tasks = 2
    # After every task all tasks are tested; about 11 curve points a task on curve_samples each.
    evaluated = tasks * tasks * (n_test + 11 * cfg.curve_samples)
    one_run = tasks * n_steps(cfg, n_train) * per_step + evaluated * per_eval
    fisher = (tasks - 1) * min(cfg.fisher_samples, n_train) * per_fisher
    return len(DEMO_STRATEGIES) * one_run + fisher


def _cmd_demo(args: argparse.Namespace) -> None:
    _check_out_folder(args)
    base = _demo_config(args)
    stand_in = base.extra.get("stand_in")
    if stand_in:
        fast = " (--fast changes nothing: the stand-in is small already)" if args.fast else ""
        note = (
            f"note: STAND-IN: {base.benchmark} (scikit-learn's digits, 2 tasks, shared head) "
            f"instead of {stand_in['for']}, because {stand_in['reason']}{fast}."
        )
        print(note, file=sys.stderr)
    print(f"demo: {base.benchmark}, strategies {', '.join(DEMO_STRATEGIES)}")
    if not stand_in:  # the stand-in takes seconds
        eta = _demo_eta(base, 10000 if args.fast else 60000)
        print(f"demo: ETA about {eta / 60:.1f} minutes on this machine (priced by a timed step)")
    results = compare(
        base,
        DEMO_STRATEGIES,
        [0],
        args.out,
        progress=not args.quiet,
        resume=False,
        log_dir=args.log_dir,
    )
    _finish(results, args.out, args)
    if stand_in:
        print(note + " The results and the report say so too.", file=sys.stderr)


def _cmd_report(args: argparse.Namespace) -> None:
    from ewc.report import write_report

    if args.out.suffix != ".html":
        raise UsageError(f"--out must name a .html file, got {str(args.out)!r}")
    for path in (args.out, args.out.with_suffix(".md")):
        check_output(path, inputs=args.results)
    loaded = [load_results(p) for p in args.results]
    sweeps = [r for r in loaded if r["schema"] == "ewc.sweep/1"]
    results = [r for r in loaded if r["schema"] != "ewc.sweep/1"]
    if not results:
        raise UsageError("give at least one run results file (not only sweep.json)")
    if len(sweeps) > 1:
        raise UsageError(
            f"give at most one sweep.json (a report shows one sweep), got {len(sweeps)}"
        )
    html, md = write_report(results, args.out, sweep=sweeps[0] if sweeps else None)
    print(f"report: {_shown(html)}\nsummary: {_shown(md)}")


def _cmd_fisher(args: argparse.Namespace) -> None:
    from ewc.lm import compute_fisher

    check_output(args.out, folder=True, inputs=[args.data])
    file = compute_fisher(
        args.model,
        args.data,
        kind=args.kind,
        samples=args.samples,
        max_length=args.max_length,
        batch_size=args.batch_size,
        text_field=args.text_field,
        label_field=args.label_field,
        paragraphs=args.paragraphs,
        seed=args.seed,
        device=args.device,
        progress=not args.quiet,
    )
    file.save(args.out)
    total = sum(f.numel() for f in file.importance.values())
    print(
        f"{file.fisher} Fisher of {file.model['class']} ({len(file.importance)} tensors, "
        f"{total} parameters) on {file.n_samples} samples of {args.data}: {args.out}"
    )


COMMANDS = {
    "run": _cmd_run,
    "compare": _cmd_compare,
    "sweep": _cmd_sweep,
    "demo": _cmd_demo,
    "report": _cmd_report,
    "fisher": _cmd_fisher,
}


def _require_extras(args: argparse.Namespace) -> None:
    """Name a missing extra before any work: the report needs matplotlib ([plots]), ``ewc
    fisher`` transformers ([hf]), progress bars need tqdm ([cli]); ``--no-report`` and
    ``--quiet`` do without them. ``--log-dir`` without TensorBoard writes its CSV file alone,
    and says so."""
    if args.command in ("report", "demo"):
        require("matplotlib", "plots")
    elif args.command == "fisher":
        require("transformers", "hf")
    elif not args.no_report:
        require("matplotlib", "plots", "pass --no-report")
    if not getattr(args, "quiet", True):
        require("tqdm", "cli", "pass --quiet")
    if getattr(args, "log_dir", None) is not None:
        try:
            require("tensorboard", "tensorboard")
        except MissingExtraError as e:  # the CSV file is written all the same: said once, here
            print(f"note: --log-dir: writing {CSV_NAME} only. {e}", file=sys.stderr)
            warnings.simplefilter("ignore", MissingExtraWarning)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ewc`` console script; returns the exit code.

    Under ``torchrun`` every rank computes the same results and rank 0 speaks: the other ranks
    print nothing but running out of memory, which is their own (tagged with their rank).
    """
    if int(os.environ.get("RANK") or 0) == 0:
        return _main(argv)
    with open(os.devnull, "w") as quiet, redirect_stdout(quiet), redirect_stderr(quiet):
        return _main(argv)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """Print a warning as one line, ``ewc: warning: ...``, without Python's source line."""
    print(f"ewc: warning: {_one_line(str(message))}", file=sys.stderr if file is None else file)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "threads", None) is not None:
        import torch

        torch.set_num_threads(args.threads)
    try:
        with warnings.catch_warnings():  # filters set by _require_extras last one command
            warnings.showwarning = _show_warning
            _check_single_values(args)
            _require_extras(args)
            COMMANDS[args.command](args)
    except (UsageError, ValueError, OSError, MissingExtraError, MemoryError, RuntimeError) as e:
        if os.environ.get("EWC_DEBUG") or (isinstance(e, RuntimeError) and not _out_of_memory(e)):
            raise
        # Missing data is no typo: its message lists every place looked, one per line.
        message = str(e).strip() if isinstance(e, DataNotFoundError) else _one_line(str(e))
        where, stream = f"ewc {args.command}", sys.stderr
        if isinstance(e, MemoryError | RuntimeError):
            message = f"out of memory ({message}); use a smaller model, batch size or task count"
            if os.environ.get("RANK"):  # this rank's own failure: said on every rank
                where, stream = f"{where} (rank {os.environ['RANK']})", sys.__stderr__
        print(f"{where}: error: {message}", file=stream)
        return 2
    except KeyboardInterrupt:
        print(
            f"ewc {args.command}: interrupted; finished runs and tasks are saved: run the same "
            "command again to resume",
            file=sys.stderr,
        )
        return 130
    return 0


def _one_line(text: str) -> str:
    """A multi-line message as one line: a line that ends a sentence or opens a list (``.``,
    ``:``) runs on with a space, other line breaks become ``; ``."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    parts = lines[:1]
    for line in lines[1:]:
        parts.append((" " if parts[-1].endswith((".", ":")) else "; ") + line)
    return "".join(parts)


def _out_of_memory(e: RuntimeError) -> bool:
    """Whether torch failed to allocate memory that the settings asked for (the CPU allocator
    says so in words only). Other RuntimeErrors are bugs and keep their traceback; the errors
    for bad input are ValueErrors (ConfigError, ResultsError, OutputError, DataIntegrityError,
    FisherError), OSErrors (DataNotFoundError, unreadable files) or a missing extra."""
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)


if __name__ == "__main__":
    sys.exit(main())
