"""One pairing rule for D3 in every report: a run's bp_frozen baseline is found wherever it lives in
the results folder, and a run without one reads "D3 not evaluated" (with the reason), never PASS."""

from __future__ import annotations

from creditaudit.diagnostics.verdict import NOT_EVALUATED
from creditaudit.reports.audit import build_audit, markdown
from creditaudit.reports.collect import collect
from creditaudit.reports.tables import all_tables
from creditaudit.runs.pairing import experiment_key, find_baseline
from tests.results_factory import SEEDS, make_run


def _audit(root, setting="main_audit", **kw):
    return build_audit(collect(root), setting=setting, **kw)


def test_the_baseline_is_found_in_another_setting(tmp_path):
    for seed in SEEDS:
        make_run(tmp_path, "main_audit", "fa", seed)
        make_run(tmp_path, "frozen_baselines", "bp_frozen", seed)
    audit = _audit(tmp_path)
    (fa,) = audit.rules
    assert all(r.baseline is not None and r.baseline.setting == "frozen_baselines" for r in fa.runs)
    assert fa.stats["depth_pp"][2] == 3 and fa.verdict.unevaluated == 0
    assert fa.verdict.label == "PASS" and fa.verdict.claim == "trustworthy"
    tables = {t.key: t for t in all_tables(collect(tmp_path))}
    d3 = tables["table1"].header.index("D3 depth utility (pp)")
    assert tables["table1"].rows[0][d3].endswith("(n=3)")
    assert not any("D3 not evaluated" in n for n in tables["table1"].notes)


def test_without_a_baseline_no_run_passes(tmp_path):
    for seed in SEEDS:
        make_run(tmp_path, "main_audit", "fa", seed)  # healthy figures: nothing fires
        make_run(tmp_path, "main_audit", "dfa", seed)  # D1 and D2 fire
    audit = _audit(tmp_path)
    fa, dfa = audit.rules
    assert all(
        r.verdict.label == f"{NOT_EVALUATED} (1/1)" and "--with-baselines" in r.verdict.d3_missing
        for r in fa.runs
    )
    assert fa.verdict.label == f"{NOT_EVALUATED} (3/3)" and fa.verdict.claim == "undetermined"
    assert (
        dfa.verdict.label.startswith("FAIL(D1 3/3 + D2 3/3")
        and dfa.verdict.claim == "needs walk-back"
    )
    text = markdown(audit)
    assert "## D3 not evaluated" in text and "| PASS |" not in text
    tables = {t.key: t for t in all_tables(collect(tmp_path))}
    verdicts = [row[tables["table1"].header.index("verdict")] for row in tables["table1"].rows]
    assert "PASS" not in verdicts
    assert any(n.startswith("**D3 not evaluated** for 6 runs") for n in tables["table1"].notes)


def test_pairing_ignores_credit_and_logging_fields_but_not_the_experiment(tmp_path):
    run = make_run(
        tmp_path,
        "early_checkpoints",
        "dfa",
        42,
        overrides=(
            "lam=1e-2",
            "save_epochs=1,2",
            "trajectory=true",
            "local_rule=cosine",
            "full_every=1",
        ),
    )
    same = make_run(tmp_path, "controls", "bp_frozen", 42, arch_label="resmlp-ep3")
    other_epochs = make_run(tmp_path, "controls", "bp_frozen", 123, epochs=5)
    from creditaudit.config import to_dict

    assert experiment_key(to_dict(run)) == experiment_key(to_dict(same))
    assert experiment_key(to_dict(run)) != experiment_key(to_dict(other_epochs))
    col = collect(tmp_path)
    dfa = next(r for r in col.runs if r.rule == "dfa")
    assert find_baseline(dfa, col.runs).setting == "controls"


def test_the_runs_own_setting_is_preferred(tmp_path):
    make_run(tmp_path, "main_audit", "fa", 42)
    make_run(tmp_path, "main_audit", "bp_frozen", 42)
    make_run(tmp_path, "frozen_baselines", "bp_frozen", 42)
    col = collect(tmp_path)
    fa = next(r for r in col.runs if r.rule == "fa")
    assert find_baseline(fa, col.runs).setting == "main_audit"


def test_the_inventory_counts_added_controls_and_runs_beyond_the_study_apart(tmp_path):
    from creditaudit.reports.inventory import inventory_markdown

    make_run(tmp_path, "main_audit", "fa", 42)
    make_run(tmp_path, "main_audit", "bp_frozen", 42)
    make_run(tmp_path, "controls", "bp_frozen", 42, arch_label="resmlp-ep3")
    make_run(tmp_path, "controls", "bp_frozen", 123, arch_label="resmlp-ep3")
    make_run(tmp_path, "extended_rules", "kp", 42)
    text = inventory_markdown(collect(tmp_path), tmp_path)
    assert (
        "| Study runs + **added controls** (D3 baselines, `controls/`) + runs beyond the study | 2 + **2** + 1 |"
        in text
    )
    # a method's and an architecture's rows say how many of their runs are added controls
    assert "| bp_frozen | 3 (of which 2 added controls) |" in text
    assert "| fa | 1 |" in text
    assert "| controls | 2 | 3 |" in text  # the setting's own row: all of them are
