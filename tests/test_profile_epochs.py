"""How many epochs each run trains, pinned: every setting under every sweep profile, and the main
audit under every audit profile (a profile's ``epochs`` rule, its base's, its recipe). The tables
are literal data, taken from the registry as it stood when the rule was written down in one place
(``Profile.epochs``); a change to a profile or a setting that moves any run's epochs shows here."""

from __future__ import annotations

import pytest

from creditaudit import experiments

SWEEP_PROFILES = ("paper", "cpu", "smoke", "mnist1d")
# setting -> epochs under each profile of SWEEP_PROFILES
SWEEP_EPOCHS = {
    "main_audit": (100, 6, 1, 100),
    "cross_arch": (100, 6, 1, 100),
    "depth_sweep": (100, 6, 1, 100),
    "frozen_baselines": (100, 6, 1, 100),
    "penalty_rescue": (30, 2, 1, 30),
    "dfa_pen_30ep_diag": (30, 2, 1, 30),
    "penalty_1e-4": (30, 2, 1, 30),
    "penalty_1e-1": (30, 2, 1, 30),
    "bp_penalty": (30, 2, 1, 30),
    "matched_30ep": (30, 2, 1, 30),
    "sbcb_vanilla_30ep": (30, 2, 1, 30),
    "no_terminal_ln": (100, 6, 1, 100),
    "no_residual": (100, 6, 1, 100),
    "random_labels": (100, 6, 1, 100),
    "early_checkpoints": (5, 5, 2, 5),
    "snapshot_evolution": (100, 6, 1, 100),
    "dfa_pen_100ep": (100, 6, 1, 100),
    "ep_6seeds": (100, 6, 1, 100),
    "extended_rules": (100, 6, 1, 100),
}
# audit profile -> epochs of its runs (mode1's recipe sets epochs=16 itself)
AUDIT_EPOCHS = {"paper": 100, "default": 6, "double": 12, "mnist1d": 100, "mode1": 16}


def test_the_tables_cover_every_setting_and_profile():
    assert experiments.profile_names(experiments.SWEEP) == list(SWEEP_PROFILES)
    assert set(SWEEP_EPOCHS) == set(experiments.SETTINGS.names())
    assert experiments.profile_names(experiments.AUDIT) == list(AUDIT_EPOCHS)


@pytest.mark.parametrize("name", sorted(SWEEP_EPOCHS))
def test_every_run_of_a_setting_trains_its_pinned_epochs(name):
    for profile, epochs in zip(SWEEP_PROFILES, SWEEP_EPOCHS[name], strict=True):
        assert {c.epochs for c in experiments.expand(name, profile=profile)} == {epochs}, (
            name,
            profile,
        )


@pytest.mark.parametrize("profile", sorted(AUDIT_EPOCHS))
def test_every_run_of_an_audit_trains_its_pinned_epochs(profile):
    cfgs = experiments.audit_configs(["bp", "dfa"], profile=profile)
    assert {c.epochs for c in cfgs} == {AUDIT_EPOCHS[profile]}


def test_checkpoint_epochs_past_a_shortened_run_are_dropped():
    """early_checkpoints keeps a checkpoint after each epoch its profile trains."""
    assert {c.save_epochs for c in experiments.expand("early_checkpoints", profile="smoke")} == {
        (1, 2)
    }
    assert {c.save_epochs for c in experiments.expand("early_checkpoints", profile="cpu")} == {
        (1, 2, 3, 4, 5)
    }
