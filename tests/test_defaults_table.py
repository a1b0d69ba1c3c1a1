"""docs/defaults.md is generated from the code's default strengths and the validation sweep, so
they cannot disagree: the table is current, and each swept default is the sweep's choice."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / "scripts" / "defaults_table.py"


def test_docs_defaults_table_is_current():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
