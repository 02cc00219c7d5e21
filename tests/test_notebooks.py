"""The teaching notebooks execute top to bottom on the embedded model (kernel only; no browser)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
CELL_LIMIT_S = 60
DURATIONS: dict[str, float] = {}  # notebook -> seconds, filled as they run


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    # Every cell within a minute (the course's rule; nbclient fails the cell past it), files written in tmp_path.
    nbclient.NotebookClient(nb, timeout=CELL_LIMIT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    DURATIONS[path.name] = time.perf_counter() - t0
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ has no notebooks"


def test_all_notebooks_together_run_within_ten_minutes():
    """Runs after the notebooks (pytest keeps file order): the course as a whole stays within its CI budget."""
    if len(DURATIONS) < len(NOTEBOOKS):
        pytest.skip("not every notebook ran in this session (selected with -k?)")
    total = sum(DURATIONS.values())
    assert total <= 600, f"notebooks took {total:.0f} s together: {DURATIONS}"
