"""Verdicts, fire epochs, modes and the audit report, on metrics logs with known content."""

from __future__ import annotations

import json
import math

import pytest

from creditaudit.diagnostics.verdict import Thresholds, mean_std, rule_verdict, run_verdict
from creditaudit.reports.audit import build_audit, html_page, markdown, plots
from creditaudit.reports.collect import collect


def log(acc, d1=None, gL=None, deep=None):
    """Per-epoch records (epoch 0 first: diagnostics only)."""
    n = len(acc)
    d1 = d1 or [1.2] * (n + 1)
    gL = gL or [1e-2] * (n + 1)
    deep = deep or [0.5] * (n + 1)
    recs = [
        {
            "epoch": 0,
            "diag/d1": d1[0],
            "diag/gL_norm": gL[0],
            "credit/deep_cos": deep[0],
            "diag/train_loss_fixed": 2.3,
        }
    ]
    for e in range(1, n + 1):
        recs.append(
            {
                "epoch": e,
                "test/acc": acc[e - 1],
                "diag/d1": d1[e],
                "diag/gL_norm": gL[e],
                "credit/deep_cos": deep[e],
                "diag/train_loss_fixed": 2.3 - 0.1 * e,
            }
        )
    return recs


BASE = log([0.80, 0.82, 0.83])
TH = Thresholds()


def test_a_healthy_run_passes():
    v = run_verdict(log([0.85, 0.87, 0.88]), BASE, TH)
    assert v.label == "PASS" and v.modes == [] and v.depth_utility_pp == pytest.approx(5.0)


def test_fire_epochs_are_the_first_crossing():
    v = run_verdict(
        log([0.85, 0.87, 0.88], d1=[1, 2, 60, 800], gL=[1e-2, 1e-5, 1e-8, 1e-10]), BASE, TH
    )
    assert v.fired == {"D1": 2, "D2": 2, "D3": None}
    assert v.label == "FAIL(D1 1/1 + D2 1/1)" and v.modes == ["Mode 1(a)", "Mode 1(b)"]


def test_d3_uses_the_final_depth_utility_and_dates_the_last_crossing():
    v = run_verdict(
        log([0.79, 0.86, 0.84]), BASE, TH
    )  # +1 pp at the end: fires; below since epoch 3
    assert v.fired["D3"] == 3 and v.depth_utility_pp == pytest.approx(1.0)
    assert run_verdict(log([0.79, 0.80, 0.90]), BASE, TH).fired["D3"] is None  # passes at the end


def test_mode_2_when_the_reference_is_valid_but_credit_is_not():
    v = run_verdict(log([0.85, 0.87, 0.88], deep=[0.0, 0.02, -0.01, 0.03]), BASE, TH)
    assert v.modes == ["Mode 2"] and v.label == "PASS"
    rv = rule_verdict("x", [v, run_verdict(log([0.85, 0.87, 0.88]), BASE, TH)])
    assert rv.label == "PASS" and rv.claim == "needs walk-back"


def test_rule_verdict_counts_seeds():
    bad = run_verdict(log([0.85, 0.87, 0.88], gL=[1e-2, 1e-8, 1e-9, 1e-9]), BASE, TH)
    good = run_verdict(log([0.85, 0.87, 0.88]), BASE, TH)
    rv = rule_verdict("dfa", [bad, good, bad])
    assert rv.label == "FAIL(D2 2/3)" and not rv.trustworthy


def test_mean_std_uses_ddof_1():
    m, s, n = mean_std([1.0, 2.0, 3.0, None, math.nan])
    assert (m, n) == (2.0, 3) and s == pytest.approx(1.0)
    assert math.isnan(mean_std([4.0])[1])


def _write_run(root, setting, rule, seed, records, status="finished", arch="resmlp"):
    d = root / setting / f"{rule}__{arch}__s{seed}"
    d.mkdir(parents=True)
    cfg = {
        "rule": rule,
        "arch": arch,
        "seed": seed,
        "epochs": 3,
        "data": {"dataset": "digits", "data_dir": ""},
        "model": {},
    }
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "summary.json").write_text(json.dumps({"status": status, "epochs_done": 3}))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return d


def test_audit_of_a_results_folder_with_known_content(tmp_path):
    for seed, accs in ((1, [0.85, 0.87, 0.88]), (2, [0.86, 0.88, 0.90])):
        _write_run(tmp_path, "s", "bp", seed, log(accs))
        _write_run(tmp_path, "s", "bp_frozen", seed, BASE)
        _write_run(tmp_path, "s", "dfa", seed, log([0.6, 0.7, 0.75], gL=[1e-2, 1e-6, 1e-8, 1e-9]))
    _write_run(tmp_path, "s", "fa", 1, log([0.8, 0.8, 0.8]), status="running")
    broken = tmp_path / "s" / "ep__resmlp__s1"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "summary.json").write_text("{}")
    audit = build_audit(collect(tmp_path), setting="s")
    rules = {ra.rule: ra for ra in audit.rules}
    assert set(rules) == {"bp", "dfa"}
    assert rules["bp"].verdict.label == "PASS" and rules["bp"].verdict.claim == "trustworthy"
    m, s, n = rules["bp"].stats["test_acc"]
    assert (
        n == 2 and m == pytest.approx(0.89) and s == pytest.approx(0.02 / math.sqrt(2))
    )  # std of {0.88, 0.90}, ddof=1
    assert rules["bp"].stats["depth_pp"][0] == pytest.approx(6.0)
    assert rules["dfa"].verdict.label == "FAIL(D2 2/2 + D3 2/2)" and rules["dfa"].fire_epochs(
        "D2"
    ) == [2, 2]
    assert any("ep__resmlp__s1" in p for p in audit.problems)
    assert [r.rule for r in audit.not_finished] == ["fa"]
    md = markdown(audit, title="t")
    assert (
        "| bp | 0.890 ± 0.014 (n=2)" in md
        and "FAIL(D2 2/2 + D3 2/2)" in md
        and "## Definitions" in md
    )
    pngs = plots(audit)
    assert set(pngs) == {"norms", "cosines", "accuracy"} and all(
        p[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs.values()
    )
    page = html_page(audit, pngs, title="t")
    assert page.count("data:image/png;base64,") == 3 and "http" not in page.replace(
        "https://", ""
    )  # self-contained


def test_every_table_figure_has_a_definition_in_the_docs():
    from pathlib import Path

    from creditaudit.reports.audit import FIGURES

    doc = (Path(__file__).parents[1] / "docs" / "audit.md").read_text()
    for title, _definition in FIGURES.values():
        assert title in doc, f"docs/audit.md does not define {title!r}"


# ---------------------------------------------------------------------------------------------
# End to end, through the command line, on the bundled digits data
# ---------------------------------------------------------------------------------------------
def _audit_cli(*args):
    from click.testing import CliRunner

    from creditaudit.cli import main

    return CliRunner().invoke(main, ["audit", *args], catch_exceptions=False)


TINY = ("dataset=digits", "train_subset=0", "epochs=3", "d=32", "L=2", "threads=1")


@pytest.mark.slow
def test_bp_passes_every_diagnostic_at_every_epoch(tmp_path):
    res = _audit_cli(
        f"results={tmp_path}", *TINY, "--rule", "bp", "--seeds", "1,2", "--workers", "1"
    )
    assert res.exit_code == 0, res.output
    audit = build_audit(collect(tmp_path), setting="main_audit")
    (bp,) = audit.rules
    assert bp.rule == "bp" and bp.verdict.label == "PASS" and bp.verdict.claim == "trustworthy"
    for ra in bp.runs:
        logged = [r for r in ra.run.metrics if "diag/d1" in r]
        assert [r["epoch"] for r in logged] == [0, 1, 2, 3]
        assert all(r["diag/d1"] <= TH.d1_ratio and r["diag/gL_norm"] >= TH.d2_norm for r in logged)
        assert all(r["credit/deep_cos"] == pytest.approx(1.0, abs=1e-6) for r in logged)
        assert ra.verdict.depth_utility_pp >= TH.d3_pp
    report = tmp_path / "_reports" / "main_audit"
    assert (
        (report / "audit.md").exists()
        and (report / "audit.html").exists()
        and (report / "audit_norms.png").exists()
    )


@pytest.mark.slow
def test_audit_of_a_researchers_own_rule_and_re_audit_without_training(tmp_path):
    from tests.test_plugins import MY_RULE

    path = tmp_path / "my_rule.py"
    path.write_text(MY_RULE.format(name="mysigndfa"))
    res = _audit_cli(
        f"results={tmp_path / 'r'}", *TINY, "--rule", str(path), "--seeds", "1", "--workers", "1"
    )
    assert res.exit_code == 0, res.output
    assert (
        "mysigndfa" in res.output
        and (tmp_path / "r" / "main_audit" / "mysigndfa__resmlp__s1").is_dir()
    )
    metrics = tmp_path / "r" / "main_audit" / "mysigndfa__resmlp__s1" / "metrics.jsonl"
    before = metrics.stat().st_mtime_ns
    again = _audit_cli(str(tmp_path / "r"))  # re-audit: reads the folder, trains nothing
    assert again.exit_code == 0 and "mysigndfa" in again.output
    assert metrics.stat().st_mtime_ns == before


def test_re_audit_of_a_missing_folder_is_one_clear_error(tmp_path):
    res = _audit_cli(str(tmp_path / "nope"))
    assert res.exit_code == 2 and "no results folder" in res.output
