"""Write docs/defaults.md: the default strength of every benchmark x scenario x regularizer.

    python scripts/defaults_table.py            # rewrite docs/defaults.md
    python scripts/defaults_table.py --check    # exit 1 when docs/defaults.md is out of date

Strengths are read from the code (:func:`ewc.runner.resolve_config`: ``BENCHMARK_DEFAULTS``,
else ``GENERIC_LAM``); the offline benchmarks' validation sweep from docs/defaults-sweep.json
(written by scripts/choose_defaults.py). The table therefore cannot disagree with either, and a
default that differs from the sweep's choice is an error. tests/test_defaults_table.py runs
``--check``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from ewc.data.streams import BENCHMARKS
from ewc.runner import BENCHMARK_DEFAULTS, REGULARIZED, RunConfig, resolve_config

DOCS = Path(__file__).parents[1] / "docs"
SWEEP = DOCS / "defaults-sweep.json"
TABLE = DOCS / "defaults.md"
SCENARIOS = ("task", "domain", "class")

HEADER = """# Default strengths

The λ (SI's c, MAS's λ) that `ewc run` / `compare` / `demo` use when `--lam` is not given, for
every built-in benchmark, scenario and regularizer. Generated from the code by
`python scripts/defaults_table.py` (the tests check that this file is current); our penalty is
`(λ/2)·Σ Ω (θ − θ*)²` (README).

- **split-digits, permuted-digits** (offline, seconds a run): chosen on validation by
  `python scripts/choose_defaults.py --out docs/defaults-sweep.json` — for each cell a grid of
  decades, seeds {seeds}, {val:.0%} of each task's training data held out; the λ with the best
  mean validation ACC wins (a λ whose runs diverge is skipped). The cell shows λ, then the mean
  **test** ACC (%) over the same seeds of the strategy at that λ and of naive fine-tuning.
  *cannot help*: at the λ chosen on validation the strategy does not beat naive on test
  (typically class-incremental learning, where regularizers of this kind do not help, van de Ven
  et al. 2022); the choice is then a small λ that keeps it close to naive.
- **The others**: MNIST-sized benchmarks are too costly to sweep on this project's 2-core
  machine for every cell, and rotated-digits was not swept for lack of time. ‡: chosen on
  validation for this cell, see [results.md](results.md) (permuted-mnist-32 shares
  permuted-mnist's values, chosen on its 28×28 inputs); †: not chosen for this cell — the
  benchmark's value for another scenario, or the untuned fallback (the value chosen for
  task-incremental Split MNIST): choose it with `ewc sweep` before relying on it.
"""


def _lam(value: float) -> str:
    """``1e3`` for powers of ten, else ``%g``."""
    exponent = math.log10(value) if value > 0 else math.nan
    return f"1e{round(exponent)}" if math.isclose(exponent, round(exponent)) else f"{value:g}"


def _swept_cell(cell: dict[str, Any], lam: float) -> str:
    where = f"{cell['benchmark']} / {cell['scenario']} / {cell['strategy']}"
    if not math.isclose(lam, cell["chosen"]):
        raise ValueError(
            f"{where}: the code's default λ is {lam:g} but the validation sweep chose "
            f"{cell['chosen']:g}; update BENCHMARK_DEFAULTS or rerun scripts/choose_defaults.py"
        )
    test, naive = 100 * cell["test_acc"], 100 * cell["naive_test_acc"]
    verdict = " — *cannot help*" if test <= naive else ""
    return f"{_lam(lam)} ({test:.1f} vs {naive:.1f}){verdict}"


def _cell(benchmark: str, scenario: str, strategy: str, swept: dict[tuple, Any]) -> str:
    lam = resolve_config(RunConfig(benchmark=benchmark, scenario=scenario, strategy=strategy)).lam
    assert lam is not None
    if (benchmark, scenario, strategy) in swept:
        return _swept_cell(swept[benchmark, scenario, strategy], lam)
    # A strategy-wide entry was chosen in the benchmark's default scenario only.
    table = BENCHMARK_DEFAULTS.get(benchmark, {}).get("lam", {})
    default_scenario = BENCHMARKS[benchmark].default_scenario
    tuned = f"{strategy}/{scenario}" in table or (
        strategy in table and scenario == default_scenario
    )
    return f"{_lam(lam)} {'‡' if tuned else '†'}"


def render() -> str:
    """The whole of docs/defaults.md."""
    cells = json.loads(SWEEP.read_text(encoding="utf-8"))
    swept = {(c["benchmark"], c["scenario"], c["strategy"]): c for c in cells}
    header = ["benchmark", "scenario", *REGULARIZED]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for benchmark in sorted(BENCHMARKS, key=lambda b: (b.endswith("-digits"), b)):
        for scenario in SCENARIOS:
            row = [_cell(benchmark, scenario, s, swept) for s in REGULARIZED]
            lines.append(f"| {benchmark} | {scenario} | " + " | ".join(row) + " |")
    first = cells[0]
    text = HEADER.format(seeds=", ".join(map(str, first["seeds"])), val=first["val_fraction"])
    return text + "\n" + "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the file is out of date")
    args = parser.parse_args()
    text = render()
    if args.check:
        if TABLE.read_text(encoding="utf-8") != text:
            print(f"{TABLE} is out of date: run python scripts/defaults_table.py", file=sys.stderr)
            return 1
        return 0
    TABLE.write_text(text, encoding="utf-8")
    print(TABLE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
