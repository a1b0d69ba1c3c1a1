"""Draw the forgetting-learning frontier from results files of several strategies and λ.

    python scripts/make_frontier_figure.py runs/frontier/*/*.json \
        --reference "seed notebook=0.9116,0.6290" --out docs/frontier

writes docs/frontier.png: per strategy and λ, the earlier tasks' test accuracy kept after the
last task (y) against the last task's (x), mean ± std over the seeds found (one point per λ,
a strategy's points joined in order of λ), with naive and joint as single points and each
``--reference NAME=NEW,OLD`` (fractions) as a star. tests/test_frontier.py runs it on small
fresh runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ewc.plots import frontier_points, plot_frontier, save_figure
from ewc.results import load_results


def reference(text: str) -> tuple[str, tuple[float, float]]:
    """``"NAME=NEW,OLD"`` -> ``(NAME, (NEW, OLD))``."""
    name, _, values = text.rpartition("=")
    new, old = (float(v) for v in values.split(","))
    return name, (new, old)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="results JSON files")
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix")
    parser.add_argument(
        "--reference", type=reference, action="append", default=[], help="NAME=NEW,OLD"
    )
    args = parser.parse_args()
    try:
        points = frontier_points([load_results(p) for p in args.results])
    except (OSError, ValueError) as e:  # a missing or foreign file: one line, not a traceback
        parser.error(str(e))
    for p in points:
        print(f"{p.strategy:10s} λ={p.lam!s:8s} new {p.new.percent()}  old {p.old.percent()}")
    figure = plot_frontier(points, dict(args.reference))
    for path in save_figure(figure, args.out, formats=("png",)):
        print(path)


if __name__ == "__main__":
    main()
