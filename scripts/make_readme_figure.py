"""Make the README's figure from a comparison's results files.

    python scripts/make_readme_figure.py runs/seed/runs/*-seed0.json --out docs/demo_accuracy

writes docs/demo_accuracy.png and .svg: each task's test accuracy over training, one panel per
strategy (the classic forgetting figure).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ewc.plots import plot_accuracy_curves, save_figure
from ewc.results import load_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="results JSON files")
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix")
    args = parser.parse_args()
    runs = [load_results(p) for p in args.results]
    for path in save_figure(plot_accuracy_curves(runs), args.out):
        print(path)


if __name__ == "__main__":
    main()
