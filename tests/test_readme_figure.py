"""scripts/make_readme_figure.py, run as the README says, on small runs of the current code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ewc.results import save_results
from ewc.runner import RunConfig, run

SCRIPT = Path(__file__).parents[1] / "scripts" / "make_readme_figure.py"


def test_readme_figure_script_writes_one_png(tmp_path):
    tiny = dict(benchmark="permuted-digits", n_tasks=2, scenario="domain", hidden=(16,))
    paths = [
        save_results(
            run(RunConfig(**tiny, strategy=s, iterations=20, seed=0)), tmp_path / f"{s}-seed0.json"
        )
        for s in ("naive", "ewc")
    ]
    out = tmp_path / "figure" / "demo_accuracy"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, paths), "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
        env={"MPLBACKEND": "Agg", "PATH": ""},
    )
    png = out.with_suffix(".png")
    assert done.stdout.split() == [str(png)]
    assert [p.name for p in png.parent.iterdir()] == ["demo_accuracy.png"]  # no stray SVG
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_readme_figure_script_names_a_missing_results_file(tmp_path):
    """The README's command before ``scripts/demo.sh`` has run: one line, not a traceback."""
    missing = tmp_path / "runs" / "demo" / "naive-seed0.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(missing), "--out", str(tmp_path / "f")],
        capture_output=True,
        text=True,
        env={"MPLBACKEND": "Agg", "PATH": ""},
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and str(missing) in done.stderr.splitlines()[-1]
    assert not list(tmp_path.glob("f*"))
