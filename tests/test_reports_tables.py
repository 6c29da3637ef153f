"""`creditaudit inventory` and `creditaudit tables` on a results folder with known content: every
count and every mean ± std (ddof=1) is checked against values computed here, independently."""

from __future__ import annotations

import statistics

import pytest
from click.testing import CliRunner

from creditaudit.cli import main
from creditaudit.diagnostics.verdict import Thresholds
from creditaudit.reports import tables
from creditaudit.reports.collect import collect
from creditaudit.reports.inventory import inventory_markdown
from tests.results_factory import SEEDS, figures, study


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return study(tmp_path_factory.mktemp("study") / "results")


def ms(values: list[float], *, sci: bool = False) -> str:
    """The expected cell, computed with the standard library (statistics.stdev is ddof=1)."""
    mean, std = statistics.fmean(values), statistics.stdev(values)
    if sci:
        return f"{mean:.2e} ± {std:.1e} (n={len(values)})"
    return f"{mean:.3f} ± {std:.3f} (n={len(values)})"


def rows_by_first(table: tables.Table) -> dict[str, list[str]]:
    return {r[0]: r for r in table.rows}


def test_inventory_counts(results):
    text = inventory_markdown(collect(results), results, generated="2026-01-01")
    lines = text.splitlines()

    def row(first: str) -> str:
        return next(line for line in lines if line.startswith(f"| {first} |"))

    # 21 main audit + 9 penalty + 2 depth + 3 cross-arch (one failed) + 1 interrupted (its summary
    # says running, but no process holds its lock); 1 corrupt folder skipped.
    assert (
        row("**Total training runs**")
        == "| **Total training runs** | **36** (1 failed, 34 finished, 1 interrupted) |"
    )
    assert row("**Unique models** (method × arch × seed × setting)").endswith("| **36** |")
    # 34 finished × 3 epochs + the failed and the interrupted run with 2 epochs done each.
    assert row("**Total training epochs**").endswith("| **106** |")
    cpu_h = (21 * 360 + 9 * 120 + 2 * 720 + 100) / 3600
    cuda_h = (2 * 1800 + 60) / 3600
    assert f"**{cpu_h + cuda_h:.2f} hours** ({cpu_h:.2f} h cpu, {cuda_h:.2f} h cuda)" in row(
        "**Estimated total device time** (logged wall time)"
    )
    assert "**7** (6 primary + 1 frozen/shallow variants)" in row("**Training methods**")
    assert row("**Architectures**").endswith("| **5** |")
    assert row("**Experiment settings**").endswith("| **5** |")
    # bp, fa, dfa, ep, sb, cb, bp_frozen on resmlp; dfa at two depths; dfa, bp on smallcnn; dfa no-residual.
    assert row("**Method × architecture combinations**").endswith("| **12** |")

    assert row("dfa").startswith("| dfa | 11 (10 finished; 1 interrupted) |")
    assert row("bp").startswith("| bp | 4 (3 finished; 1 failed) |")
    for rule in ("fa", "ep", "bp_frozen"):
        assert row(rule).startswith(f"| {rule} | 3 |")
    assert row("sb").startswith("| sb | 6 |") and row("cb").startswith("| cb | 6 |")

    assert row("resmlp d=256 L=4 + terminal LN").startswith(
        "| resmlp d=256 L=4 + terminal LN | 30 |"
    )
    assert row("smallcnn d=256 L=3").startswith("| smallcnn d=256 L=3 | 3 (2 finished; 1 failed) |")
    assert row("resmlp d=512 L=2 + terminal LN").startswith(
        "| resmlp d=512 L=2 + terminal LN | 1 |"
    )
    assert row("resmlp d=256 L=4 + terminal LN no residual").startswith(
        "| resmlp d=256 L=4 + terminal LN no residual | 1 (0 finished; 1 interrupted) |"
    )

    assert row("main_audit").startswith(f"| main_audit | 21 | 3 | {21 * 360 / 3600:.2f} |")
    assert row("penalty_rescue").startswith(f"| penalty_rescue | 9 | 3 | {9 * 120 / 3600:.2f} |")
    assert row("cross_arch").startswith(
        f"| cross_arch | 3 (2 finished; 1 failed) | 3 | {(2 * 1800 + 60) / 3600:.2f} |"
    )
    assert row("fashion_mnist").startswith(
        "| fashion_mnist | 36 (34 finished; 1 failed, 1 interrupted) |"
    )

    assert f"- `{results}/main_audit/` — 21 runs: bp, bp_frozen, fa, dfa, ep, sb, cb" in text
    assert f"- `{results}/depth_sweep/` — 2 runs: dfa" in text
    skipped = text[text.index("## Skipped or unfinished") :]
    assert "dfa__resmlp-noskip__s123" in skipped and "not valid JSON" in skipped
    assert (
        "bp__smallcnn__s42: status failed" in skipped
        and (
            f"dfa__resmlp-noskip__s42: interrupted (its process is gone and left no run.lock): resume with "
            f"`creditaudit train rule=dfa arch=resmlp seed=42 setting=no_residual results={results} "
        )
        in skipped
    )
    assert "### FA vs DFA" in text and "### Functional triangulation" in text


def test_table1_and_fa_vs_dfa_figures(results):
    col = collect(results)
    th = Thresholds()
    header, rows = tables.table1(col, th).header, rows_by_first(tables.table1(col, th))
    assert list(rows) == ["bp", "fa", "dfa", "ep", "sb", "cb"]
    acc = header.index("test acc")
    frozen = {s: figures("bp_frozen", "main_audit", s)["test/acc"] for s in SEEDS}
    for rule in rows:
        accs = [figures(rule, "main_audit", s)["test/acc"] for s in SEEDS]
        assert rows[rule][acc] == ms(accs)
        depth = [100 * (figures(rule, "main_audit", s)["test/acc"] - frozen[s]) for s in SEEDS]
        assert rows[rule][header.index("D3 depth utility (pp)")] == ms(depth)
        hl = [figures(rule, "main_audit", s)["diag/hL_norm"] for s in SEEDS]
        assert rows[rule][header.index("‖h_L‖")] == ms(hl, sci=True)
    assert rows["dfa"][header.index("verdict")] == "FAIL(D1 3/3 + D2 3/3)"
    assert rows["fa"][header.index("verdict")] == "PASS"

    fvd = rows_by_first(tables.fa_vs_dfa(col, th))
    assert tables.fa_vs_dfa(col, th).header[1:] == ["FA (3 runs in all)", "DFA (10 runs in all)"]
    assert fvd["test acc (main audit)"][1:] == [
        ms([figures(r, "main_audit", s)["test/acc"] for s in SEEDS]) for r in ("fa", "dfa")
    ]
    assert fvd["‖g_L‖"][2] == ms(
        [figures("dfa", "main_audit", s)["diag/gL_norm"] for s in SEEDS], sci=True
    )
    assert fvd["deep cos"][1] == ms(
        [figures("fa", "main_audit", s)["credit/deep_cos"] for s in SEEDS]
    )
    assert fvd["Mode 1(b): D2 fires"][1:] == ["–", "3/3 at ep 3,3,3"]


def test_penalty_sweep_has_a_row_per_penalised_rule_with_its_mean_accuracy(results):
    pen = tables.penalty_sweep(collect(results), Thresholds())
    assert [(r[0], r[1], r[2], r[3], r[4]) for r in pen.rows] == [
        (r, "0.01", "3", "penalty_rescue", "3") for r in ("dfa", "sb", "cb")
    ]
    acc = pen.header.index("test acc")
    for r in pen.rows:
        assert r[acc] == ms([figures(r[0], "penalty_rescue", s)["test/acc"] for s in SEEDS])


def test_depth_sweep_has_a_row_per_depth_and_no_std_for_a_single_seed(results):
    depth = tables.depth_sweep(collect(results), Thresholds())
    assert [(r[0], r[1], r[2], r[3]) for r in depth.rows] == [
        ("dfa", "2", "512", "1"),
        ("dfa", "6", "512", "1"),
    ]
    assert depth.rows[0][depth.header.index("test acc")] == "0.400 (n=1)"  # one seed: no std


def test_cross_arch_averages_only_the_finished_runs_of_each_architecture(results):
    cross = tables.cross_arch(collect(results), Thresholds())
    cnn = [r for r in cross.rows if r[0].startswith("smallcnn")]
    assert [(r[1], r[3]) for r in cnn] == [("dfa", "2")]  # the failed bp run is not averaged
    assert cnn[0][cross.header.index("test acc")] == ms(
        [figures("dfa", "cross_arch", s)["test/acc"] for s in SEEDS[:2]]
    )
    assert sum(r[0].startswith("resmlp d=256 L=4 + terminal LN") for r in cross.rows) == 6


def test_triangulation_orderings_and_agreement(results):
    tri = tables.triangulation(collect(results), Thresholds())
    assert tri.header == ["metric", "dfa", "sb", "cb", "ordering"]
    rows = rows_by_first(tri)
    drop = {
        r: [-figures(r, "penalty_rescue", s)["diag/train_loss_fixed_drop"] for s in SEEDS]
        for r in ("dfa", "sb", "cb")
    }
    assert rows["training-loss decrease"][1:4] == [ms(drop[r]) for r in ("dfa", "sb", "cb")]
    assert rows["accuracy"][-1] == "sb > cb > dfa"
    assert rows["nudging ΔL"][-1] == "sb > cb > dfa"
    assert rows["deep cos"][-1] == "cb > sb > dfa"
    assert (
        "accuracy, nudging ΔL, training-loss decrease agree; deep cos disagrees (cb vs sb)"
        in " ".join(tri.notes)
    )


def test_orderings_call_overlapping_rules_even():
    o = tables.ordering(
        {"a": (0.50, 0.02, 3), "b": (0.49, 0.02, 3), "c": (0.30, 0.01, 3)}, higher_better=True
    )
    assert tables.render_ordering(o) == "a ≈ b > c"
    low = tables.ordering({"a": (-1e-3, 1e-4, 3), "b": (-1e-5, 1e-6, 3)}, higher_better=False)
    assert tables.render_ordering(low) == "a > b"


def test_cli_writes_both_reports_and_survives_corrupt_folders(results, tmp_path):
    runner = CliRunner()
    out = runner.invoke(
        main, ["tables", str(results), "--out", str(tmp_path / "tables.md")], catch_exceptions=False
    )
    assert out.exit_code == 0, out.output
    md = (tmp_path / "tables.md").read_text()
    for title in (
        "Table 1: main audit",
        "FA vs DFA",
        "Penalty sweep",
        "Depth sweep",
        "Cross-architecture",
        "Functional triangulation",
    ):
        assert f"## {title}" in md
    assert "not valid JSON" in md and "skipped" in out.output
    inv = runner.invoke(main, ["inventory", str(results)], catch_exceptions=False)
    assert inv.exit_code == 0, inv.output
    assert (results / "_reports" / "TRAINING_INVENTORY.md").exists()
    assert "36 runs (34 finished)" in inv.output and "1 folder(s) skipped" in inv.output
    # The generated reports folder is not mistaken for a setting.
    assert "_reports" not in {r.setting for r in collect(results).runs}


def test_cli_names_a_missing_results_folder_and_an_unknown_table(tmp_path):
    runner = CliRunner()
    out = runner.invoke(main, ["inventory", str(tmp_path / "nope")])
    assert out.exit_code == 2 and "no results folder" in out.output
    out = runner.invoke(main, ["tables", str(tmp_path), "--table", "table9"])
    assert out.exit_code == 2 and "unknown table 'table9'" in out.output


def test_an_empty_results_folder_gives_empty_tables_not_a_crash(tmp_path):
    col = collect(tmp_path)
    text = tables.tables_markdown(col)
    assert text.count("*No finished runs for this table in the results folder.*") == len(
        tables.TABLES
    )
    assert "**0**" in inventory_markdown(col, tmp_path)
