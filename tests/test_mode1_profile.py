"""The ``mode1`` audit profile shows what the protocol exists to catch, on a CPU: DFA fires D1
(Mode 1(a)) and D2 (Mode 1(b)) in every seed, BP fires neither (docs/audit.md, "A profile where
Mode 1 fires").

It trains the whole profile (bp, fa, dfa and bp_frozen × 3 seeds on Fashion-MNIST; about 15-20
minutes on two cores), so it is marked ``mode1``, which pyproject deselects by default:

    .venv/bin/python -m pytest -m mode1 tests/test_mode1_profile.py
"""

from __future__ import annotations

import pytest

from creditaudit import experiments
from creditaudit.data import check_dataset
from creditaudit.reports.audit import build_audit
from creditaudit.reports.collect import collect


def test_the_profile_trains_bp_fa_dfa_and_the_baseline_in_its_own_setting(tmp_path):
    cfgs = experiments.audit_configs(
        list(experiments.get_profile("mode1", experiments.AUDIT).audit_rules),
        profile="mode1",
        results=str(tmp_path),
    )
    assert sorted({c.rule for c in cfgs}) == ["bp", "bp_frozen", "dfa", "fa"] and len(cfgs) == 12
    c = cfgs[0]
    assert (
        c.setting == "mode1" and c.data.dataset == "fashion_mnist" and c.data.train_subset == 20000
    )
    assert (c.batch_size, c.optim.lr, c.optim.schedule, c.optim.weight_decay) == (
        16,
        1e-2,
        "constant",
        0.0,
    )
    # the user's overrides still come last
    assert (
        experiments.audit_configs(
            ["dfa"], profile="mode1", results=str(tmp_path), overrides=("epochs=3",)
        )[0].epochs
        == 3
    )


@pytest.mark.mode1
@pytest.mark.timeout(3600)
def test_dfa_fires_mode_1a_and_1b_in_every_seed_and_bp_fires_neither(tmp_path):
    from click.testing import CliRunner

    from creditaudit.cli import main

    if check_dataset("fashion_mnist") is None:
        pytest.skip("Fashion-MNIST is not available (creditaudit data fetch fashion_mnist)")
    res = CliRunner().invoke(
        main, ["audit", "--profile", "mode1", f"results={tmp_path}"], catch_exceptions=False
    )
    assert res.exit_code == 0, res.output
    audit = build_audit(collect(tmp_path), setting="mode1")
    rules = {ra.rule: ra for ra in audit.rules}
    assert set(rules) == {"bp", "fa", "dfa"} and not audit.not_finished
    for ra in rules.values():
        assert ra.verdict.n == 3
    dfa, bp = rules["dfa"], rules["bp"]
    assert all(e is not None for e in dfa.fire_epochs("D1")), dfa.fire_epochs("D1")
    assert all(e is not None for e in dfa.fire_epochs("D2")), dfa.fire_epochs("D2")
    assert dfa.verdict.modes.get("Mode 1(a)") == 3 and dfa.verdict.modes.get("Mode 1(b)") == 3
    assert bp.fire_epochs("D1") == [None] * 3 and bp.fire_epochs("D2") == [None] * 3
    assert not bp.verdict.modes.get("Mode 1(a)") and not bp.verdict.modes.get("Mode 1(b)")
