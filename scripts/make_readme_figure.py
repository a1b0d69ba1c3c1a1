"""Make the README's figure from a comparison's results files.

    ewc demo && python scripts/make_readme_figure.py runs/demo/naive-seed0.json \
        runs/demo/ewc-seed0.json --out docs/demo_accuracy

writes docs/demo_accuracy.png (PNG only: the README shows that file): each task's test accuracy
over training, one panel per strategy (the classic forgetting figure). tests/test_readme_figure.py
runs this script on small fresh runs, so it keeps working with the current code.
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
    try:
        runs = [load_results(p) for p in args.results]
    except (OSError, ValueError) as e:  # a missing or foreign file: one line, not a traceback
        parser.error(str(e))
    for path in save_figure(plot_accuracy_curves(runs), args.out, formats=("png",)):
        print(path)


if __name__ == "__main__":
    main()
