"""A lean install: ``pip install ewc`` needs torch and numpy; the rest are extras named on use."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
OPTIONAL = (
    "matplotlib",
    "yaml",
    "ruamel",
    "sklearn",
    "tqdm",
    "transformers",
    "peft",
    "lightning",
    "trl",
)


def python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_core_dependencies_are_torch_numpy_and_safetensors() -> None:
    """safetensors (no dependencies of its own) writes and reads importance files."""
    names = [re.split(r"[<>=!~ ;\[]", d)[0] for d in PYPROJECT["project"]["dependencies"]]
    assert sorted(names) == ["numpy", "safetensors", "torch"]


def test_importing_ewc_and_its_core_imports_no_extra() -> None:
    """``import ewc`` (library, Fisher, runner, regularizers) loads none of the extras' packages
    (tqdm may come with torch itself, so only ewc's own imports are checked by blocking)."""
    blocked = "".join(f"sys.modules[{name!r}] = None\n" for name in OPTIONAL)
    done = python(f"import sys\n{blocked}import ewc, ewc.cli, ewc.distributed\nprint('ok')")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


@pytest.mark.parametrize(
    ("module", "blocked", "extra"),
    [("ewc.plots", "matplotlib", "plots"), ("ewc.report", "matplotlib", "plots")],
)
def test_a_missing_extra_is_named_in_the_error(module: str, blocked: str, extra: str) -> None:
    done = python(f"import sys\nsys.modules[{blocked!r}] = None\nimport {module}")
    assert done.returncode != 0
    assert "MissingExtraError" in done.stderr
    assert f"pip install 'ewc[{extra}]'" in done.stderr


def test_the_digits_benchmark_names_its_extra() -> None:
    code = (
        "import sys\nsys.modules['sklearn'] = None\nimport ewc\n"
        "try:\n    ewc.load_dataset('digits', 'train')\n"
        "except ImportError as e:\n    print(e)\n"
    )
    done = python(code)
    assert "pip install 'ewc[digits]'" in done.stdout, done.stdout + done.stderr


def test_every_extra_the_code_names_exists_and_all_holds_them() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    named = set()
    for path in (ROOT / "src" / "ewc").rglob("*.py"):
        named |= set(re.findall(r"require\(\s*\"[\w.]+\",\s*\"(\w+)\"\)", path.read_text()))
    assert named, "no require() calls found: the pattern is out of date"
    assert named <= set(extras), named - set(extras)
    everything = extras["all"][0]
    for extra in named:
        assert extra in everything, f"[all] lacks {extra}"


def test_requires_python_matches_the_code() -> None:
    """The code's oldest syntax target (ruff, mypy) and requires-python agree."""
    low = PYPROJECT["project"]["requires-python"].removeprefix(">=")
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py" + low.replace(".", "")


def _cli(argv: list[str], blocked: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    """``ewc ARGV`` in a fresh process where the ``blocked`` packages cannot be imported."""
    code = "".join(f"sys.modules[{name!r}] = None\n" for name in blocked)
    code = f"import sys\n{code}from ewc.cli import main\nsys.exit(main({argv!r}))"
    return python(code)


# The core install: no extra's packages but scikit-learn's, which the offline benchmark needs.
CORE = tuple(name for name in OPTIONAL if name != "sklearn")
TINY = [
    "run",
    "--benchmark",
    "split-digits",
    "--strategy",
    "ewc",
    "--epochs",
    "0.2",
    "--hidden",
    "16",
]


def test_the_core_install_runs_no_report_to_the_end(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    done = _cli([*TINY, "--quiet", "--no-report", "--out", str(out)], CORE)
    assert done.returncode == 0, done.stderr
    assert out.exists() and "| ewc | 1 |" in done.stdout


@pytest.mark.parametrize(
    ("flags", "extra", "instead"),
    [(["--quiet"], "plots", "--no-report"), (["--no-report"], "cli", "--quiet")],
)
def test_a_missing_extra_is_named_before_any_work(
    tmp_path: Path, flags: list[str], extra: str, instead: str
) -> None:
    out = tmp_path / "out" / "r.json"
    done = _cli([*TINY, *flags, "--out", str(out)], CORE)
    assert done.returncode == 2
    assert f"pip install 'ewc[{extra}]'" in done.stderr and f"or pass {instead}" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_the_demo_names_its_stand_ins_extra_before_the_notes_on_data(tmp_path: Path) -> None:
    code = (
        "import os, sys\nsys.modules['sklearn'] = None\n"
        f"os.environ['EWC_CACHE_DIR'] = {str(tmp_path / 'cache')!r}\n"
        "os.environ.pop('EWC_DATA_DIR', None)\n"
        "from ewc.cli import main\n"
        f"sys.exit(main(['demo', '--fast', '--no-download', '--out', {str(tmp_path / 'd')!r}]))"
    )
    done = python(code)
    assert done.returncode == 2
    assert done.stderr.startswith("ewc demo: error: the fashion-mnist and mnist files were not")
    assert "pip install 'ewc[digits]'" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and done.stdout == ""
