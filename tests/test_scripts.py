"""The setup scripts: one line saying what is installed, and no reinstall when nothing changed."""

import os
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parents[1] / "scripts"


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A checkout with the files the install depends on and a .venv whose python logs its
    calls (a stand-in for pip: the test runs offline, in a moment)."""
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'ewc'\n")
    (tmp_path / "constraints.txt").write_text("torch==2.13.0\n")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\necho "$@" >> "{tmp_path}/pip-calls"\n')
    python.chmod(0o755)
    return tmp_path


def _install(checkout: Path, extras: str) -> str:
    """``install_venv extras`` in ``checkout``; its stderr."""
    script = f"set -euo pipefail; source {SCRIPTS / 'venv.sh'}; install_venv {extras}"
    done = subprocess.run(
        ["bash", "-c", script], cwd=checkout, capture_output=True, text=True, check=True
    )
    assert done.stdout == ""
    return done.stderr


def _pip_calls(checkout: Path) -> list[str]:
    calls = checkout / "pip-calls"
    return calls.read_text().splitlines() if calls.exists() else []


def test_install_says_what_it_installs_once_and_reinstalls_only_after_a_change(checkout):
    said = _install(checkout, "cli,plots,digits")
    assert said.count("\n") == 1 and "installing ewc[cli,plots,digits]" in said
    assert _pip_calls(checkout) == ["-m pip install -q -c constraints.txt -e .[cli,plots,digits]"]
    assert _install(checkout, "cli,plots,digits") == ""  # nothing changed: silent, no pip
    assert len(_pip_calls(checkout)) == 1
    assert "installing ewc[test]" in _install(checkout, "test")  # other extras: installed
    with open(checkout / "constraints.txt", "a") as f:
        f.write("numpy<3\n")
    assert "installing ewc[test]" in _install(checkout, "test")  # changed pins: reinstalled
    assert len(_pip_calls(checkout)) == 3


def test_a_failed_install_is_tried_again(checkout):
    python = checkout / ".venv" / "bin" / "python"
    python.write_text("#!/bin/sh\nexit 1\n")
    script = f"set -euo pipefail; source {SCRIPTS / 'venv.sh'}; install_venv test"
    assert subprocess.run(["bash", "-c", script], cwd=checkout, capture_output=True).returncode
    assert not list((checkout / ".venv").glob(".ewc-install-*"))


def test_demo_script_runs_ewc_where_the_caller_stands(checkout, tmp_path):
    """``cd .. && bash ewc/scripts/demo.sh`` runs ``ewc demo`` in the caller's folder (so that
    the paths it prints open from there) with the repository's ``runs/demo`` as the default
    ``--out``, which the caller's own ``--out`` follows and so overrides."""
    repo = checkout / "ewc"
    (repo / "scripts").mkdir(parents=True)
    for name in ("demo.sh", "venv.sh"):
        (repo / "scripts" / name).write_text((SCRIPTS / name).read_text())
    for name in ("pyproject.toml", "constraints.txt", ".venv"):
        (checkout / name).rename(repo / name)
    ewc = repo / ".venv" / "bin" / "ewc"
    ewc.write_text('#!/bin/sh\necho "$PWD" "$@"\n')
    ewc.chmod(0o755)
    done = subprocess.run(
        ["bash", "ewc/scripts/demo.sh", "--fast"],
        cwd=checkout,
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "EWC_DATA_DIR": str(tmp_path)},
    )
    assert done.stdout.split() == [
        str(checkout),
        "demo",
        "--out",
        str(repo / "runs/demo"),
        "--fast",
    ]
    assert "installing ewc[cli,plots,digits]" in done.stderr
