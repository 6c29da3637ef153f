"""reproduce_all.ipynb runs end to end on a small generated results folder and writes every report."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.results_factory import make_run, study

NOTEBOOK = Path(__file__).resolve().parents[1] / "reproduce_all.ipynb"


@pytest.mark.slow
def test_reproduce_all_notebook_executes_on_a_generated_results_folder(tmp_path, monkeypatch):
    results = study(tmp_path / "results")
    make_run(results, "snapshot_evolution", "dfa", 42, epochs=4, trajectory=True)
    monkeypatch.setenv("CREDITAUDIT_RESULTS", str(results))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # The kernel is this interpreter (the project's virtualenv), wherever PATH points.
    monkeypatch.setenv(
        "PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    )
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()

    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors
    reports = results / "_reports"
    assert (reports / "TRAINING_INVENTORY.md").read_text().startswith("# Training Inventory")
    tables = (reports / "tables.md").read_text()
    for title in (
        "Table 1: main audit",
        "FA vs DFA",
        "Penalty sweep",
        "Depth sweep",
        "Cross-architecture",
        "Functional triangulation",
    ):
        assert f"## {title}" in tables
    assert (reports / "main_audit" / "audit.md").exists() and (
        reports / "snapshot_evolution.png"
    ).stat().st_size > 1000
    images = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert images >= 4
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "not valid JSON" in text  # the corrupt folder was reported, and the notebook went on


@pytest.mark.slow
def test_the_notebook_runner_script_saves_the_executed_notebook(tmp_path):
    import subprocess

    results = study(tmp_path / "results")
    script = NOTEBOOK.parent / "scripts" / "run_notebook.py"
    done = subprocess.run(
        [sys.executable, str(script), str(results)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    executed = nbformat.read(results / "_reports" / "reproduce_all.ipynb", as_version=4)
    assert all(c.get("execution_count") for c in executed.cells if c.cell_type == "code")
    missing = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "no results folder" in missing.stderr
