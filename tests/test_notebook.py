"""The tutorial notebook: committed without outputs, and runs top to bottom offline.

The run uses the notebook's tiny settings (``EWC_NOTEBOOK_FAST=1``) with no network and no MNIST
files, so it takes the offline scikit-learn digits path, as a student without data would.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "tutorial.ipynb"


def _code_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if c.cell_type == "code"]


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for cell in _code_cells(nb):
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


def test_notebook_runs_offline_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.setenv("EWC_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("EWC_NOTEBOOK_DOWNLOAD", "0")
    monkeypatch.setenv("EWC_DATA_DIR", str(tmp_path / "no-data"))
    monkeypatch.setenv("EWC_CACHE_DIR", str(tmp_path / "cache"))
    # The models are tiny: one thread is faster, and much faster on a busy shared CPU.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, with the traceback, if any cell fails

    outputs = [o for cell in _code_cells(nb) for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "using the offline 'permuted-digits' stream" in text
    figure_cells = [c for c in _code_cells(nb) if "plots.plot_" in c.source]
    for cell in figure_cells:
        assert any("image/png" in o.get("data", {}) for o in cell.outputs), cell.source
    assert "with EWC: task A" in text
