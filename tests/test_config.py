"""Typed config: overrides, parsing, validation, help, round trip."""

from __future__ import annotations

import math
import re
import typing

import pytest

from creditaudit.config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    from_dict,
    help_rows,
    to_dict,
    validate,
)
from creditaudit.registry import UnknownNameError
from creditaudit.runs.folder import RunFolder
from creditaudit.typedconfig import iter_fields, set_path


def test_overrides_by_leaf_dotted_path_and_alias():
    cfg = apply_overrides(
        TrainConfig(),
        [
            "rule=bp",
            "d=512",
            "model.L=8",
            "dataset=digits",
            "lr=3e-4",
            "out_ln=false",
            "save_epochs=1,2,5",
            "width=128",
        ],
    )
    assert cfg.model.d == 128 and cfg.model.L == 8 and cfg.data.dataset == "digits"
    assert cfg.optim.lr == 3e-4 and cfg.model.out_ln is False and cfg.save_epochs == (1, 2, 5)


def test_defaults_are_the_studys_recipe():
    cfg = TrainConfig()
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.schedule, cfg.batch_size) == (
        1e-3,
        0.01,
        "cosine",
        128,
    )
    assert cfg.data.dataset == "fashion_mnist" and cfg.arch == "resmlp"


@pytest.mark.parametrize(
    "item, message",
    [
        ("epochs=abc", "expected int"),
        ("epochs=0", "epochs must be >= 1"),
        ("lr=-1", "lr must be > 0"),
        ("out_ln=maybe", "expected bool"),
        ("colour=red", "unknown config key 'colour'"),
        ("epochz=3", "Did you mean epochs"),
        ("epochs", "expected key=value"),
        ("schedule=linear", "cosine or constant"),
        ("local_rule=shift(0)", "shift\\(eta\\)"),
    ],
)
def test_bad_values_get_one_clear_error(item, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(TrainConfig(), [item])


@pytest.mark.parametrize("item", ["rule=dfaa", "arch=resnet", "dataset=imagenet"])
def test_unknown_names_list_the_known_ones(item):
    with pytest.raises((ConfigError, UnknownNameError), match="Known"):
        apply_overrides(TrainConfig(), [item])


def test_rule_variants_are_accepted():
    assert apply_overrides(TrainConfig(), ["rule=bp_frozen"]).rule == "bp_frozen"
    assert apply_overrides(TrainConfig(), ["rule=bp_shallow"]).rule == "bp_shallow"


def test_round_trip_and_every_field_documented():
    cfg = apply_overrides(TrainConfig(), ["save_epochs=1,3", "d=64"])
    assert from_dict(to_dict(cfg)) == cfg
    for path, f, _ in iter_fields(TrainConfig):
        assert f.metadata.get("help"), f"config field {path} has no help text"
    assert len(help_rows()) == len(list(iter_fields(TrainConfig)))


def test_rule_options_by_prefix_or_leaf(monkeypatch):
    from dataclasses import dataclass, field

    from creditaudit.config import resolve_rule_options
    from creditaudit.rules import RULES, Rule

    @dataclass
    class Opts:
        beta: float = field(default=0.1, metadata={"help": "nudging strength"})
        steps: int = field(default=20, metadata={"help": "relaxation steps"})

    class Toy(Rule):
        """a toy rule with options"""

        Options = Opts

    monkeypatch.setitem(RULES._entries, "toy", type(RULES.entries()[0])("toy", Toy, "toy"))
    cfg = apply_overrides(TrainConfig(), ["toy.beta=0.5", "steps=3", "rule=toy"])
    assert cfg.rule_opts == {"beta": "0.5", "steps": "3"}
    resolved = resolve_rule_options(cfg)
    assert resolved.rule_opts == {"beta": 0.5, "steps": 3}
    with pytest.raises(ConfigError, match="its options: beta, steps"):
        apply_overrides(TrainConfig(), ["rule=toy", "toy.gamma=1"])
    with pytest.raises(ConfigError, match="expected int"):
        apply_overrides(TrainConfig(), ["rule=toy", "steps=2.5"])
    with pytest.raises(ConfigError, match="this run's rule is 'bp'"):
        apply_overrides(TrainConfig(), ["toy.beta=0.5"])
    with pytest.raises(ConfigError, match="unknown config key 'gamma'"):
        apply_overrides(TrainConfig(), ["rule=toy", "gamma=1"])


# Every float field of a run's config, nested ones included (``float | None`` too).
FLOAT_FIELDS = [
    path for path, _, tp in iter_fields(TrainConfig) if tp is float or float in typing.get_args(tp)
]


@pytest.mark.parametrize("path", FLOAT_FIELDS)
def test_every_float_field_round_trips_through_config_json(path, tmp_path):
    """What a run folder's config.json records is what the run used: any finite value of every float
    field is read back equal; inf and nan, which JSON cannot hold, are refused with the field named."""
    folder = RunFolder(tmp_path / "run")
    for value in (1 / 3, -2.5e-300, 1.7976931348623157e308, 0.0):
        cfg = TrainConfig()
        set_path(cfg, path, value)
        folder.write_config(to_dict(cfg))
        assert from_dict(folder.read_config()) == cfg, (path, value)
    for text in ("inf", "-inf", "nan", "1e999"):
        with pytest.raises(ConfigError, match=re.escape(path) + ".*expected a finite number"):
            apply_overrides(TrainConfig(), [f"{path}={text}"])
    cfg = TrainConfig()
    set_path(cfg, path, math.inf)  # built in Python, not parsed: validation refuses it too
    with pytest.raises(ConfigError, match=re.escape(path) + "=inf: expected a finite number"):
        validate(cfg)


def test_a_non_finite_rule_option_is_refused():
    with pytest.raises(ConfigError, match="finite"):
        apply_overrides(TrainConfig(), ["rule=ep", "ep.beta=inf"])


def test_lr_inf_is_refused_by_the_command_line_with_exit_2(tmp_path):
    from click.testing import CliRunner

    from creditaudit.cli import main

    result = CliRunner().invoke(
        main, ["train", "lr=inf", f"results={tmp_path / 'r'}"], catch_exceptions=False
    )
    assert result.exit_code == 2 and "optim.lr=inf: expected a finite number" in result.stderr
    assert not (tmp_path / "r").exists()
