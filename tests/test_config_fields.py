"""No config field is ever silently ignored: every field × every rule (and its _frozen/_shallow
variants) is either honoured — the run computes something different from the default config's — or
refused with one ConfigError line that says why. The tables below classify every field of
TrainConfig and every rule option; a field added without a row here fails this test."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from creditaudit.config import ConfigError, TrainConfig, apply_overrides
from creditaudit.models import ARCHS
from creditaudit.models.base import ARCH_SPECIFIC_FIELDS, arch_fields
from creditaudit.rules import RULES
from creditaudit.rules.base import VARIANTS
from creditaudit.training.run import build_run, train_step
from creditaudit.typedconfig import iter_fields

ALL_RULES = [r for base in RULES.names() for r in (base, *(f"{base}_{v}" for v in VARIANTS))]

# Fields whose effect is on training (parameters, rule state) or on the data a run sees, with a
# non-default value: checked on every rule.
TRAINING = {
    "seed": "7",
    "epochs": "3",
    "batch_size": "24",
    "lam": "0.05",
    "local_rule": "cosine",
    "optim.lr": "3e-3",
    "optim.weight_decay": "0.2",
    "optim.beta1": "0.5",
    "optim.beta2": "0.9",
    "optim.schedule": "constant",
    "model.d": "24",
    "model.L": "3",
    "model.out_ln": "false",
    "model.residual": "false",
    "data.train_subset": "600",
    "data.test_subset": "100",
    "data.random_labels": "true",
    "data.augment": "crop_flip",
}
# Architecture-specific model fields: honoured by the architectures that read them, refused by the others.
ARCH_FIELD_VALUES = {
    "w2_std": "0.5",
    "activation": "gelu",
    "heads": "2",
    "patch": "2",
    "channels": "4,6,10",
}
# Fields of the student task: honoured with dataset=student, refused with any other dataset.
STUDENT = {
    "data.student_alpha": "1.0",
    "data.student_dim": "12",
    "data.student_width": "16",
    "data.student_classes": "4",
    "data.student_train": "300",
    "data.student_test": "50",
}
# Diagnostics: honoured by the probe (its output changes), refused with diag.enabled=false.
DIAG = {
    "diag.eval_n": "64",
    "diag.every": "2",
    "diag.full_every": "1",
    "diag.rho_dirs": "4",
    "diag.rho_n": "64",
    "diag.rho_eps": "1e-2",
    "diag.nudge_eta": "0.05",
    "diag.nudge_relative": "true",
    "diag.stab_batches": "3",
    "diag.stab_batch_size": "32",
    "diag.trajectory": "true",
}
# Fields that never change what a run computes, by design (the run folder is reused across them),
# or that change only its name or where it lives; and those tested where they act.
NOT_SEMANTIC = {
    "progress",
    "results",
    "threads",
    "device",
    "eval_batch_size",
    "data.data_dir",
    "arch_label",
    "setting",
    "logger",
    "logger_dir",
}
ELSEWHERE = {
    "rule": "every test here walks it",
    "arch": "test_architecture_fields_are_honoured_where_read_and_refused_elsewhere",
    "plugins": "tests/test_plugins.py: a rule file registers and trains",
    "rule_opts": "RULE_OPTION_VALUES below",
    "data.dataset": "tests/test_data_*.py: every dataset loads",
    "diag.enabled": "test_diag_fields_are_honoured_or_refused",
    "save_epochs": "test_logging_fields_act_on_the_run_folder",
    "data.mnist1d_signals": "tests/test_data_synthetic.py: sets mnist1d's size, refused on other datasets",
}
# One non-default value for every option of every built-in rule.
RULE_OPTION_VALUES = {
    "bp": {},
    "fa": {"init": "uniform", "scale": "2.0", "identity": "true", "structure": "dense"},
    "fa_layerwise": {"init": "normal", "scale": "2.0"},
    "dfa": {"init": "uniform", "scale": "2.0"},
    "ep": {"beta": "0.2", "T": "21", "alpha": "0.05", "symmetric": "true", "credit": "error"},
    "sb": {
        "est_lr": "3e-3",
        "width": "24",
        "depth": "2",
        "code": "label",
        "exact_terminal": "true",
        "rms_out": "true",
    },
    "cb": {
        "est_lr": "3e-3",
        "width": "24",
        "depth": "2",
        "code": "label",
        "K": "3",
        "sigma": "0.3",
        "noise": "relative",
        "temp": "0.3",
        "ema": "0.9",
        "terminal_w": "2.0",
        "dfa_warmup": "true",
        "warmup_frac": "0.9",
    },
    "vec": {
        "est_lr": "3e-3",
        "width": "24",
        "depth": "2",
        "code": "label",
        "M": "2",
        "eps": "0.05",
        "terminal": "false",
        "fd_layers": "0",
    },
    "usf": {"scale": "2.0"},
    "frsf": {"init": "uniform", "scale": "2.0"},
    "brsf": {"init": "uniform", "scale": "2.0"},
    "kp": {"init": "normal", "scale": "2.0"},
    "drtp": {"init": "normal", "scale": "2.0"},
    "pepita": {"F_scale": "0.1"},
    "dtp": {"target_step": "0.01", "sigma": "0.2", "fb_lr": "1e-2"},
    "fwdgrad": {"directions": "3"},
}
# Options that the tiny resmlp run refuses (they act on other architectures: tested there below).
REFUSED_ON_RESMLP = {("fa", "structure")}
# Options that only act together with another option of the same rule: set both.
OPTION_NEEDS = {("cb", "warmup_frac"): ("dfa_warmup=true",)}


def _config(*items: str, arch: str = "resmlp") -> TrainConfig:
    """A tiny run on digits; blocks L=2 where the architecture and the rule have a choice."""
    shallow = any(i.startswith("rule=") and i.endswith("_shallow") for i in items)
    base = [
        "dataset=digits",
        f"arch={arch}",
        "d=16",
        "epochs=2",
        "batch_size=32",
        "threads=1",
        "progress=false",
        "train_subset=300",
        "L=2" if not arch.startswith("smallcnn") and not shallow else "",
        "channels=4,6,8" if arch.startswith("smallcnn") else "",
        "heads=4" if arch.startswith("vit_mini") else "",
    ]
    return apply_overrides(TrainConfig(), [i for i in (*base, *items) if i])


def _signature(cfg: TrainConfig, steps: int = 2) -> list[torch.Tensor]:
    """What a run computes in its first steps: parameters, the rule's state, the data it sees."""
    run = build_run(cfg)
    batches = run.loader.epoch(0)
    for _ in range(steps):
        train_step(run, *next(batches))
    sig = [p.detach().clone() for p in run.model.parameters()]
    sig += [v.detach().clone() for v in _tensors(run.rule.state_dict())]
    sig += [run.data.x_train, run.data.y_train, run.data.x_test, run.data.y_test]
    return sig


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for k in sorted(obj, key=str) for t in _tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def _differs(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) != len(b) or any(
        x.shape != y.shape or not torch.equal(x, y) for x, y in zip(a, b, strict=True)
    )


def _honoured_or_refused(rule: str, item: str, *, arch: str = "resmlp", reference=None) -> str:
    """'refused' (one ConfigError line, at validation or when the run is built, before any file is
    written) or 'honoured' (the run computes something else); fails otherwise."""
    try:
        changed = _signature(_config(f"rule={rule}", item, arch=arch))
    except ConfigError as exc:
        assert "\n" not in str(exc) and str(exc), f"{rule} {item}: refusal must be one line"
        return "refused"
    reference = (
        reference if reference is not None else _signature(_config(f"rule={rule}", arch=arch))
    )
    assert _differs(changed, reference), (
        f"{rule} on {arch}: {item} is accepted but changes nothing (silently ignored)"
    )
    return "honoured"


def test_the_tables_classify_every_field_and_option():
    covered = (
        set(TRAINING)
        | {f"model.{k}" for k in ARCH_FIELD_VALUES}
        | set(STUDENT)
        | set(DIAG)
        | NOT_SEMANTIC
        | set(ELSEWHERE)
    )
    fields = {path for path, _, _ in iter_fields(TrainConfig)}
    assert fields - covered == set(), "classify these config fields in tests/test_config_fields.py"
    assert set(ARCH_FIELD_VALUES) == set(ARCH_SPECIFIC_FIELDS)
    for rule in RULES.names():
        options = {f.name for f in dataclasses.fields(RULES.get(rule).Options)}
        assert set(RULE_OPTION_VALUES.get(rule, {})) == options, (
            f"give every option of rule {rule!r} a value here"
        )


@pytest.mark.parametrize("rule", ALL_RULES)
def test_training_fields_are_honoured_or_refused(rule):
    reference = _signature(_config(f"rule={rule}"))
    outcome = {
        key: _honoured_or_refused(rule, f"{key}={value}", reference=reference)
        for key, value in TRAINING.items()
    }
    variant = rule.rpartition("_")[2] if rule.rpartition("_")[2] in VARIANTS else None
    end_to_end = RULES.get(rule.removesuffix(f"_{variant}") if variant else rule).end_to_end
    # The refusals are exactly the ones the field docs promise; everything else is honoured.
    expected = {
        k
        for k, applies in (
            ("lam", variant is not None),
            ("local_rule", end_to_end),
            ("model.L", variant == "shallow"),
            ("model.residual", variant == "shallow"),
        )
        if applies
    }
    assert {k for k, v in outcome.items() if v == "refused"} == expected


@pytest.mark.parametrize("rule", ["bp", "dfa"])
@pytest.mark.parametrize("arch", ARCHS.names())
def test_architecture_fields_are_honoured_where_read_and_refused_elsewhere(rule, arch):
    reference = _signature(_config(f"rule={rule}", arch=arch))
    for name, value in ARCH_FIELD_VALUES.items():
        got = _honoured_or_refused(rule, f"{name}={value}", arch=arch, reference=reference)
        assert got == ("honoured" if name in arch_fields(arch) else "refused"), (arch, name, got)


def test_refusals_say_why():
    with pytest.raises(ConfigError, match="trains end to end"):
        _config("rule=bp", "local_rule=cosine")
    with pytest.raises(ConfigError, match="_frozen baseline does not train"):
        _config("rule=dfa_frozen", "lam=0.01")
    with pytest.raises(ConfigError, match="no blocks"):
        _config("rule=bp_shallow", "L=3")
    with pytest.raises(
        ConfigError,
        match=r"model.heads=2 has no effect on arch 'resmlp' \(read by vit_mini, vit_mini1d\)",
    ):
        _config("heads=2")
    with pytest.raises(ConfigError, match="student task only"):
        _config("student_dim=12")
    with pytest.raises(ConfigError, match=r"diag.enabled=false"):
        _config("diag.enabled=false", "trajectory=true")


def test_student_fields_are_honoured_on_the_student_task_and_refused_elsewhere():
    reference = _signature(apply_overrides(_config(), ["dataset=student"]))
    for key, value in STUDENT.items():
        assert _honoured_or_refused("bp", f"{key}={value}") == "refused"
        changed = _signature(apply_overrides(_config(), ["dataset=student", f"{key}={value}"]))
        assert _differs(changed, reference), (
            f"{key} is accepted on the student task but changes nothing"
        )


@pytest.mark.parametrize("rule", RULES.names())
def test_rule_options_are_honoured_or_refused(rule):
    steps = 6  # past a 20% warm-up of the 20 steps of the tiny run
    reference = _signature(_config(f"rule={rule}"), steps=steps)
    for option, value in RULE_OPTION_VALUES[rule].items():
        items = [f"{rule}.{option}={value}", *OPTION_NEEDS.get((rule, option), ())]
        base = (
            _signature(_config(f"rule={rule}", *items[1:]), steps=steps) if items[1:] else reference
        )
        try:
            changed = _signature(_config(f"rule={rule}", *items), steps=steps)
        except ConfigError as exc:
            assert (rule, option) in REFUSED_ON_RESMLP, f"{rule}.{option}={value} refused: {exc}"
            continue
        assert _differs(changed, base), f"{rule}.{option}={value} is accepted but changes nothing"
    # An option of another rule is refused.
    other = next(r for r in RULE_OPTION_VALUES if r != rule and RULE_OPTION_VALUES[r])
    option, value = next(iter(RULE_OPTION_VALUES[other].items()))
    with pytest.raises(ConfigError, match="an option of rule"):
        _config(f"rule={rule}", f"{other}.{option}={value}")


def test_fa_structure_acts_on_multi_axis_states_and_is_refused_where_it_cannot():
    reference = _signature(_config("rule=fa", arch="vit_mini"))
    assert _differs(
        _signature(_config("rule=fa", "fa.structure=dense", arch="vit_mini")), reference
    )
    with pytest.raises(ConfigError, match=r"fa.structure=kron has no effect here"):
        _signature(
            _config("rule=fa", "fa.structure=kron", arch="vit_mini")
        )  # auto is kron on equal token×d shapes
    with pytest.raises(ConfigError, match=r"fa.structure=dense has no effect here"):
        _signature(
            _config("rule=fa", "fa.structure=dense")
        )  # vector states: one map whatever the structure


def test_diag_fields_are_honoured_or_refused():
    from creditaudit.diagnostics import probe

    def probed(*items: str) -> dict:
        run = build_run(
            _config("rule=dfa", "diag.stab_batch_size=32", *items)
        )  # digits' 360 test examples: 11 batches
        return {
            "full": probe(
                run.model, run.rule, run.data, run.cfg.diag, full=True, seed=run.cfg.seed
            ),
            "due": [e for e in range(3) if run.cfg.diag.every and e % run.cfg.diag.every == 0],
        }

    reference = probed()
    for key, value in DIAG.items():
        with pytest.raises(ConfigError, match=r"diag.enabled=false"):
            _config("diag.enabled=false", f"{key}={value}")
        if key == "diag.stab_batch_size":
            value = "16"
        if key in ("diag.every", "diag.full_every"):
            from creditaudit.diagnostics import due

            cfg = _config(f"{key}={value}").diag
            default = _config().diag
            assert [due(cfg, e, 4) for e in range(5)] != [due(default, e, 4) for e in range(5)], key
            continue
        assert probed(f"{key}={value}") != reference, (
            f"{key}={value} is accepted but the probe is unchanged"
        )


def test_logging_fields_act_on_the_run_folder(tmp_path):
    from creditaudit.config import run_path
    from creditaudit.runs.folder import RunFolder
    from creditaudit.training.trainer import train

    cfg = _config("rule=dfa", f"results={tmp_path}", "save_epochs=1", "trajectory=true")
    train(cfg)
    folder = RunFolder(run_path(cfg))
    assert folder.epoch_checkpoint(1).exists()
    assert any(k.startswith("traj/") for k in folder.read_metrics()[-1])
