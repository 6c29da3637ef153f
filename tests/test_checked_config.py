"""A config is checked once, where it enters, and frozen: every layer inside takes it as it is."""

from __future__ import annotations

import copy
import dataclasses

import pytest

from creditaudit import api, config
from creditaudit.rules import RULES, plugins
from creditaudit.training.trainer import prepare

RULE_FILE = """
from creditaudit.rules import RULES
from creditaudit.rules.dfa import DFA

RULES.register("{name}", "DFA under another name (a test plugin)")(type("Renamed", (DFA,), {{}}))
"""


@pytest.fixture(autouse=True)
def _isolated_registry(monkeypatch):
    monkeypatch.setattr(RULES, "_entries", dict(RULES._entries))
    monkeypatch.setattr(plugins, "_loaded_files", {})


def test_a_checked_config_is_frozen_and_its_copies_are_not():
    cfg = config.checked(config.TrainConfig(), ["rule=ep", "ep.beta=0.2", "d=64"])
    with pytest.raises(dataclasses.FrozenInstanceError, match="checked where it entered"):
        cfg.epochs = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.d = 32
    with pytest.raises(TypeError, match="frozen"):
        cfg.rule_opts["beta"] = "0.3"
    for editable in (config.copy_config(cfg), copy.deepcopy(cfg)):
        assert editable == cfg
        editable.epochs, editable.model.d, editable.rule_opts["beta"] = 3, 32, "0.3"
    assert (cfg.epochs, cfg.model.d, cfg.rule_opts["beta"]) == (100, 64, "0.2")
    assert config.checked(cfg) is cfg  # passes as it is


def test_a_checked_config_is_not_checked_again_on_its_way_in(monkeypatch):
    cfg = api.make_config("rule=dfa", "dataset=digits", "epochs=2")
    calls = []
    monkeypatch.setattr(config, "validate", lambda c: calls.append(c))
    resolved = prepare(cfg)
    assert calls == [] and resolved.rule_opts == {"init": "normal", "scale": 1.0}
    assert api.make_config(base=cfg) is cfg
    edited = config.copy_config(cfg)
    edited.epochs = 3
    prepare(edited)  # a config changed in Python is checked where it goes in
    assert len(calls) == 1


def test_overrides_leave_the_callers_config_alone(tmp_path):
    path = tmp_path / "renamed.py"
    path.write_text(RULE_FILE.format(name="renamed_dfa"))
    base = config.TrainConfig(rule=str(path))
    cfg = config.apply_overrides(base, [])
    assert (cfg.rule, cfg.plugins) == ("renamed_dfa", (str(path.resolve()),))
    assert (base.rule, base.plugins) == (str(path), ())
    config.load_plugins(cfg)  # imports, changes nothing
    assert (cfg.rule, cfg.plugins) == ("renamed_dfa", (str(path.resolve()),))


def test_a_worker_imports_the_rule_files_of_a_config_checked_elsewhere(tmp_path, monkeypatch):
    path = tmp_path / "renamed.py"
    path.write_text(RULE_FILE.format(name="renamed_dfa2"))
    sent = config.to_dict(config.checked(config.TrainConfig(), [f"rule={path}", "dataset=digits"]))
    # A fresh process: the rule file not imported, its rule unknown.
    monkeypatch.setattr(
        RULES, "_entries", {k: v for k, v in RULES._entries.items() if k != "renamed_dfa2"}
    )
    monkeypatch.setattr(plugins, "_loaded_files", {})
    received = config.from_checked_dict(sent)
    assert received.rule == "renamed_dfa2" and "renamed_dfa2" in RULES
    with pytest.raises(dataclasses.FrozenInstanceError):
        received.seed = 1


def test_the_exploit_protocol_is_checked_once_and_frozen(monkeypatch, tmp_path):
    from creditaudit.exploit import protocol, runner

    p = protocol.checked(protocol.profile("smoke"), ["fit_steps=7"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.fit_steps = 8
    assert protocol.checked(p) is p
    assert protocol.from_checked_dict(protocol.to_dict(p)) == p
    assert (
        protocol.checked(protocol.profile("smoke")).fit_steps != 7
    )  # the profile's own is untouched
    with pytest.raises(config.ConfigError, match="step_lr must be > 0"):
        protocol.checked(p, ["step_lr=0"])

    def refuse(self):
        raise AssertionError("a checked protocol was validated again")

    monkeypatch.setattr(protocol.Protocol, "validate", refuse)
    with pytest.raises(config.ConfigError, match="at least one seed"):  # got past the check
        runner.run_exploit(p, (), tmp_path / "exploit")
