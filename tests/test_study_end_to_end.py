"""The real pipeline, end to end, on small real runs: `creditaudit sweep all --with-baselines` at the
smoke profile, then `creditaudit tables`, `creditaudit inventory` and the notebook on that folder.
It asserts what a reader of the generated tables relies on. (Planted folders test the exact
arithmetic elsewhere; this test is about what the sweep really writes.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from creditaudit.reports.collect import collect
from creditaudit.reports.tables import TRIANGULATION_METRICS, all_tables

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "creditaudit.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )
    assert done.returncode == 0, (args, done.stdout[-3000:], done.stderr[-3000:])
    return done


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("study") / "results"
    _cli(
        "sweep",
        "all",
        "--with-baselines",
        "--profile",
        "smoke",
        "--workers",
        "2",
        f"results={results}",
    )
    return results


def _column(table, title: str) -> list[str]:
    i = table.header.index(title)
    return [row[i] for row in table.rows]


@pytest.mark.slow
def test_every_run_of_the_study_and_its_baselines_finished(study):
    col = collect(study)
    assert not col.problems
    statuses = Counter(r.status for r in col.runs)
    assert statuses == {"finished": len(col.runs)}, statuses
    study_runs = [r for r in col.runs if r.setting != "controls"]
    assert len(study_runs) == 125  # the registry: the seed inventory's count, at any profile
    assert len(col.runs) - len(study_runs) > 0  # added controls


@pytest.mark.slow
def test_tables_evaluate_d3_everywhere_and_bp_penalty_is_its_own_run(study):
    _cli("tables", str(study))
    text = (study / "_reports" / "tables.md").read_text()
    assert "D3 not evaluated" not in text
    tables = {t.key: t for t in all_tables(collect(study))}

    t1 = tables["table1"]
    assert {row[0] for row in t1.rows} == {"bp", "fa", "dfa", "ep", "sb", "cb"}
    assert all(
        cell != "–" and cell.endswith("(n=3)") for cell in _column(t1, "D3 depth utility (pp)")
    )
    assert all(v == "PASS" or v.startswith("FAIL") for v in _column(t1, "verdict"))

    fa_dfa = {row[0]: row[1:] for row in tables["fa_vs_dfa"].rows}
    assert all(
        c != "–" and c.endswith("(n=3)") for c in fa_dfa["D3 depth utility (pp) vs frozen baseline"]
    )

    pen = tables["penalty_sweep"]
    assert pen.rows and all(c != "–" for c in _column(pen, "D3 (pp)"))
    assert all(not v.startswith("D3 not") for v in _column(pen, "verdict"))
    for key in ("depth_sweep", "cross_arch"):
        assert all(c != "–" for c in _column(tables[key], "D3 (pp)")), key

    # BP with the penalty is trained with it: its runs differ from BP without at the same epochs.
    def final_loss(setting: str, seed: int) -> float:
        lines = (
            (study / setting / f"bp__resmlp__s{seed}" / "metrics.jsonl").read_text().splitlines()
        )
        return json.loads(lines[-1])["train/loss"]

    for seed in (42, 123, 456):
        assert final_loss("bp_penalty", seed) != final_loss("matched_30ep", seed)
    lam = {(row[0], row[1]) for row in pen.rows}
    assert ("bp", "0.01") in lam and ("bp", "0") in lam

    tri = tables["triangulation"]
    assert [row[0] for row in tri.rows] == [title for title, _ in TRIANGULATION_METRICS.values()]
    assert sorted(tri.header[1:-1]) == ["cb", "dfa", "fa", "sb"]
    assert all(
        row[-1] not in ("", "–") and all(r in row[-1] for r in ("dfa", "fa", "sb", "cb"))
        for row in tri.rows
    )
    assert any(n.startswith("Agreement:") for n in tri.notes)


@pytest.mark.slow
def test_inventory_counts_equal_the_folder(study):
    _cli("inventory", str(study))
    text = (study / "_reports" / "TRAINING_INVENTORY.md").read_text()
    folders = [
        p
        for s in study.iterdir()
        if s.is_dir() and not s.name.startswith("_")
        for p in s.iterdir()
        if p.is_dir()
    ]
    controls = [p for p in folders if p.parent.name == "controls"]
    assert f"| **Total training runs** | **{len(folders)}** ({len(folders)} finished) |" in text
    assert (
        "| Study runs + **added controls** (D3 baselines, `controls/`) | "
        f"{len(folders) - len(controls)} + **{len(controls)}** |" in text
    )
    # every run folder is its own model: the added controls of one seed differ by epochs (and
    # random labels), which their folder names carry
    assert f"| **Unique models** (method × arch × seed × setting) | **{len(folders)}** |" in text
    epochs = sum(json.loads((p / "summary.json").read_text())["epochs_done"] for p in folders)
    assert f"| **Total training epochs** | **{epochs:,}** |" in text
    for setting, n in Counter(p.parent.name for p in folders).items():
        assert f"| {setting} | {n} |" in text, setting
    added = Counter(p.name.split("__")[0] for p in controls)
    for rule, n in Counter(p.name.split("__")[0] for p in folders).items():
        note = f" (of which {added[rule]} added controls)" if 0 < added[rule] < n else ""
        assert f"| {rule} | {n}{note} |" in text, rule


@pytest.mark.slow
def test_the_notebook_runs_on_the_real_study(study):
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "run_notebook.py"), str(study)],
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reports = study / "_reports"
    assert "D3 not evaluated" not in (reports / "tables.md").read_text()
    assert (reports / "main_audit" / "audit.md").exists()
