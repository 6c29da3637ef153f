"""The audit's and the study tables' terminal output fits 80 and 100 columns without ever
splitting a figure: rendered to consoles of those widths, every figure of every row appears whole
on one line."""

from __future__ import annotations

import re

import pytest
from rich.console import Console

from creditaudit.reports.audit import build_audit, html_page, markdown
from creditaudit.reports.collect import collect
from creditaudit.reports.tables import all_tables
from creditaudit.reports.terminal import (
    _compact_cell,
    _study_cell,
    audit_legend,
    audit_table,
    compact,
    study_table,
)
from tests.results_factory import SEEDS, make_run, study


def _render(renderable, width: int) -> list[str]:
    console = Console(width=width, record=True, force_terminal=False, color_system=None)
    console.print(renderable)
    return console.export_text().splitlines()


def _numbers(cells: list[str]) -> list[str]:
    return [c for c in cells if re.match(r"^[+\-]?(\d|\.\d)", c)]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = study(tmp_path_factory.mktemp("t") / "results")
    for seed in SEEDS:
        make_run(root, "frozen_baselines", "bp_frozen", seed)
        make_run(root, "extended_rules", "fa_layerwise", seed)
    return root


def test_compact_figures():
    assert compact((0.8512, 0.0021, 3)) == ".851±.002"
    assert compact((2.7e9, 1.1e9, 3), log=True) == "2.7e9±1e9"
    assert compact((-7.46, 3.71, 3), signed=True) == "-7.5±3.7"
    assert (
        compact((0.5, float("nan"), 1)) == ".500"
        and compact((float("nan"), float("nan"), 0)) == "–"
    )
    assert compact((0.99999, 1.1e-16, 3)) == "1.000±0"  # float rounding of the mean is no spread
    assert (
        compact((0.004, 0.0003, 3)) == ".004±3e-4"
    )  # a real spread below the digits shown is kept
    assert (
        _compact_cell("1.23e+03 ± 4.5e+02 (n=3)") == "1.2e3±4e2" and _compact_cell("PASS") == "PASS"
    )


@pytest.mark.parametrize("width", [80, 100])
def test_the_audit_table_fits_and_never_splits_a_figure(results, width):
    audit = build_audit(collect(results), setting="main_audit")
    table = audit_table(audit, "audit — results/main_audit")
    lines = _render(table, width)
    assert max(len(line) for line in lines) <= width
    text = "\n".join(lines)
    for ra in audit.rules:
        cells = [
            compact(ra.stats["test_acc"]),
            compact(ra.stats["depth_pp"], signed=True),
            compact(ra.stats["deep_cos"], digits=2),
            compact(ra.stats["hL_norm"][:1] + (float("nan"), 1), log=True),
            compact(ra.stats["gL_norm"][:1] + (float("nan"), 1), log=True),
        ]
        for cell in _numbers(cells):
            assert any(cell in line for line in lines), (width, ra.rule, cell, text)
        assert any(line.lstrip().startswith(ra.rule) for line in lines)
        for d in ("D1", "D2"):  # which detectors fired, and when, survive the narrowest terminal
            epochs = [e for e in ra.fire_epochs(d) if e is not None]
            if epochs:
                assert any(f"{d}@{min(epochs)}" in line for line in lines), (width, ra.rule, text)


@pytest.mark.parametrize("width", [80, 100])
def test_every_study_table_fits_and_never_splits_a_figure(results, width):
    for t in all_tables(collect(results)):
        if not t.rows or t.key == "table1":
            continue
        lines = _render(study_table(t.title, t.header, t.rows, t.terminal), width)
        assert max(len(line) for line in lines) <= width, (t.key, width)
        keep = [i for i, h in enumerate(t.header) if t.terminal is None or h in t.terminal]
        for row in t.rows:
            for cell in _numbers([_study_cell(row[i], t.header[i]) for i in keep]):
                assert any(cell in line for line in lines), (t.key, width, cell, "\n".join(lines))


def test_a_verdict_reads_the_same_in_the_terminal_and_both_reports(results):
    audit = build_audit(collect(results), setting="main_audit")
    terminal = " ".join(" ".join(_render(audit_table(audit, "audit"), 200)).split())
    md, page = markdown(audit), html_page(audit, {})
    labels = {ra.verdict.label for ra in audit.rules}
    assert any(label.startswith("FAIL(") for label in labels)
    for label in labels:
        assert label in terminal and f"| {label} |" in md and f">{label}<" in page, label
    for run in (
        r for ra in audit.rules for r in ra.runs if r.verdict.failed
    ):  # a run is the form with n = 1
        assert (
            run.verdict.label == "FAIL(" + " + ".join(f"{d} 1/1" for d in run.verdict.failed) + ")"
        )


@pytest.mark.parametrize("width", [80, 100])
def test_the_legend_names_every_column_and_the_thresholds_in_force(results, width):
    from creditaudit.diagnostics.verdict import Thresholds

    audit = build_audit(
        collect(results), setting="main_audit", thresholds=Thresholds(d3_pp=3.5, mode2_cos=0.2)
    )
    lines = _render(audit_legend(audit), width)
    assert max(len(line) for line in lines) <= width
    text = " ".join(" ".join(lines).split())
    for word in (
        "verdict",
        "claim",
        "acc",
        "D3 pp",
        "cos",
        "‖h_L‖",
        "‖g_L‖",
        "fired@ep",
        "needs walk-back",
        "trustworthy",
    ):
        assert word in text, word
    assert "below 3.5" in text and "< 0.2" in text and "> 50" in text and "below 1e-07" in text


@pytest.mark.parametrize("width", [80, 100])
def test_a_verdict_keeps_each_detector_with_its_count(results, width):
    audit = build_audit(collect(results), setting="main_audit")
    lines = _render(audit_table(audit, "audit — results/main_audit"), width)
    assert max(len(line) for line in lines) <= width
    for ra in audit.rules:
        for chunk in ra.verdict.label.replace(" + ", " \n+ ").split(
            " \n"
        ):  # "FAIL(D1 3/3", "+ D2 3/3)"
            assert any(chunk in line for line in lines), (width, chunk, "\n".join(lines))
