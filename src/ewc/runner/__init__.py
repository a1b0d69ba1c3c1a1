"""The sequential runner: a task stream and a strategy in, an accuracy matrix and curves out.

>>> from ewc.runner import RunConfig, run
>>> result = run(RunConfig(benchmark="split-digits", strategy="ewc"))   # doctest: +SKIP
>>> result["accuracy_matrix"][-1]                                        # doctest: +SKIP

Strategies: ``naive`` (fine-tuning), ``joint`` (all data so far: the upper bound), and the
regularizers of :mod:`ewc.regularizers` (``ewc``, ``online-ewc``, ``si``, ``mas``, ``l2``,
``kfac``). Unset options take the benchmark's published protocol.

One module per concern:

* :mod:`~ewc.runner.protocols`: the published protocols and defaults (:data:`BENCHMARK_DEFAULTS`);
* :mod:`~ewc.runner.config`: :class:`RunConfig` and its resolution against a protocol;
* :mod:`~ewc.runner.masks`: the output units each scenario trains and tests on;
* :mod:`~ewc.runner.task`: one task's training step, evaluation and divergence check;
* :mod:`~ewc.runner.run`: :func:`run`, the run across tasks as a sequence of named phases;
* :mod:`~ewc.runner.importance`: the importance summaries the report draws;
* :mod:`~ewc.runner.experiments`: :func:`compare` and :func:`sweep`, several runs to files.
"""

from ewc.runner.config import (
    STRATEGY_SETTINGS,
    RunConfig,
    applicable_settings,
    describe_protocol,
    resolve_config,
    unused_settings,
)
from ewc.runner.experiments import (
    SWEEPABLE,
    compare,
    compare_configs,
    result_path,
    run_and_save,
    sweep,
    sweep_configs,
)
from ewc.runner.protocols import (
    BENCHMARK_DEFAULTS,
    DEFAULT_BENCHMARK,
    GENERIC_LAM,
    OPTIMIZERS,
    PENALTY_PATHS,
    REGULARIZED,
    STRATEGIES,
)
from ewc.runner.run import run
from ewc.runner.task import DivergedError, evaluate

__all__ = [
    "BENCHMARK_DEFAULTS",
    "DEFAULT_BENCHMARK",
    "GENERIC_LAM",
    "OPTIMIZERS",
    "PENALTY_PATHS",
    "REGULARIZED",
    "STRATEGIES",
    "STRATEGY_SETTINGS",
    "SWEEPABLE",
    "DivergedError",
    "RunConfig",
    "applicable_settings",
    "compare",
    "compare_configs",
    "describe_protocol",
    "evaluate",
    "resolve_config",
    "result_path",
    "run",
    "run_and_save",
    "sweep",
    "sweep_configs",
    "unused_settings",
]
