"""The experiment registry: every setting of the study (the seed inventory's "By Experiment
Setting" table, DESIGN §5) declared as data — rules × architecture variants × seeds × epochs ×
options — and profiles that scale data and epochs to a machine, never the definitions.

A setting expands, under a profile, into the list of run configs a sweep trains; the run folders
are ``<results>/<setting>/<rule>__<arch>__s<seed>/``. Settings whose runs differ in architecture
options (the depth sweep's L, the ablations' flags) name the variant in ``arch_tag`` so that every
run has its own folder: ``resmlp-d512-L8``.
"""
from __future__ import annotations

from dataclasses import dataclass

from creditaudit import config as C
from creditaudit.config import TrainConfig
from creditaudit.errors import ConfigError
from creditaudit.registry import Registry

SEEDS3 = (42, 123, 456)
SEEDS6 = (42, 123, 456, 789, 1011, 1213)


@dataclass(frozen=True)
class Group:
    """Runs of one architecture variant: every rule × every seed, with shared overrides."""

    rules: tuple[str, ...]
    seeds: tuple[int, ...] = SEEDS3
    arch: str = "resmlp"
    overrides: tuple[str, ...] = ()  # key=value for every run of the group (model flags, lam, …)


@dataclass(frozen=True)
class Setting:
    name: str
    summary: str
    epochs: int  # the study's (paper-profile) epochs
    groups: tuple[Group, ...]
    overrides: tuple[str, ...] = ()  # for every run of the setting

    @property
    def n_runs(self) -> int:
        return sum(len(g.rules) * len(g.seeds) for g in self.groups)


@dataclass(frozen=True)
class Profile:
    """How a machine runs a setting: data and epochs, never definitions."""

    name: str
    summary: str
    overrides: tuple[str, ...]
    epoch_scale: float  # epochs = max(min_epochs, round(study epochs × scale)); settings of ≤ keep_upto epochs keep theirs
    keep_upto: int = 5
    min_epochs: int = 1

    def epochs(self, study_epochs: int) -> int:
        if study_epochs <= self.keep_upto:
            return study_epochs
        return max(self.min_epochs, round(study_epochs * self.epoch_scale))


SETTINGS: Registry[Setting] = Registry("setting")
PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("paper", "the study: CIFAR-10, full training set, the study's epochs (a GPU)", ("dataset=cifar10",), 1.0),
        Profile("cpu", "Fashion-MNIST, 20k examples, 6% of the study's epochs (100 -> 6, 30 -> 2)",
                ("dataset=fashion_mnist", "train_subset=20000"), 0.06, min_epochs=2),
        Profile("smoke", "scikit-learn digits, 1 epoch (5-epoch settings keep 2), d=32: seconds, for tests",
                ("dataset=digits", "train_subset=0", "d=32", "channels=4,8,8"), 0.0, keep_upto=0, min_epochs=1),
    )
}


def _add(setting: Setting) -> None:
    SETTINGS.add(setting.name, setting, setting.summary)


MAIN6 = ("bp", "fa", "dfa", "ep", "sb", "cb")
D512 = ("d=512",)
for s in (
    Setting("main_audit", "6 methods × 3 seeds on the d=256 ResMLP (Table 1)", 100, (Group(MAIN6),)),
    Setting("cross_arch", "DFA/BP/EP/SB/CB on SmallCNN and DFA on ViT-Mini (§5.2)", 100,
            (Group(("dfa", "bp", "ep", "sb", "cb"), arch="smallcnn"), Group(("dfa",), arch="vit_mini"))),
    Setting("depth_sweep", "DFA + FA at d=512, L in {2,4,6,8,12} (Appendix H)", 100,
            tuple(Group(("dfa", "fa"), seeds=(42,), overrides=(*D512, f"L={L}")) for L in (2, 6, 8, 12))
            + (Group(("dfa",), overrides=(*D512, "L=4")), Group(("fa",), seeds=(42,), overrides=(*D512, "L=4")))),
    Setting("frozen_baselines", "BP/DFA × shallow/frozen × 3 seeds (diagnostic (d))", 100,
            (Group(("bp_shallow", "bp_frozen", "dfa_shallow", "dfa_frozen")),)),
    Setting("penalty_rescue", "DFA/FA/SB/CB with penalty lam=1e-2 (§5.1, §4.2)", 30, (Group(("dfa", "fa", "sb", "cb"), overrides=("lam=1e-2",)),)),
    Setting("penalty_1e-4", "DFA + FA at the weaker penalty lam=1e-4 (§5.1)", 30, (Group(("dfa", "fa"), overrides=("lam=1e-4",)),)),
    Setting("penalty_1e-1", "DFA at the stronger penalty lam=1e-1", 30, (Group(("dfa",), seeds=(42,), overrides=("lam=1e-1",)),)),
    Setting("bp_penalty", "BP + penalty lam=1e-2: the capacity-cost control (§5.2)", 30, (Group(("bp",), overrides=("lam=1e-2",)),)),
    Setting("matched_30ep", "BP/DFA/FA without penalty at 30 epochs (§5.2 matched controls)", 30, (Group(("bp", "dfa", "fa")),)),
    Setting("sbcb_vanilla_30ep", "SB and CB without penalty at 30 epochs (Appendix J)", 30, (Group(("sb", "cb"), seeds=(42,)),)),
    Setting("no_terminal_ln", "DFA on the same backbone without the terminal LN (§3.2)", 100, (Group(("dfa",), overrides=("out_ln=false",)),)),
    Setting("no_residual", "DFA on the same backbone without the skip path (§3.1 falsification)", 100, (Group(("dfa",), overrides=("residual=false",)),)),
    Setting("random_labels", "DFA/FA/SB/CB/EP with i.i.d. random training labels (§3.1)", 100,
            (Group(("dfa", "fa", "sb", "cb", "ep"), seeds=(42,), overrides=("random_labels=true",)),)),
    Setting("early_checkpoints", "DFA + FA for 5 epochs, a checkpoint after each (§4.1, Mode 2)", 5,
            (Group(("dfa", "fa"), overrides=("save_epochs=1,2,3,4,5",)),)),
    Setting("snapshot_evolution", "DFA with the per-epoch h_L, g_L trajectory, ρ every 10 epochs (§3.1)", 100,
            (Group(("dfa",), overrides=("full_every=10", "trajectory=true")),)),
    Setting("dfa_pen_100ep", "DFA + penalty lam=1e-2 over 100 epochs (long-horizon rescue)", 100, (Group(("dfa",), overrides=("lam=1e-2",)),)),
    Setting("ep_6seeds", "EP replicated over 6 seeds", 100, (Group(("ep",), seeds=SEEDS6),)),
):
    _add(s)


def arch_tag(arch: str, overrides: tuple[str, ...]) -> str:
    """A run-folder architecture name that tells variants of one architecture apart."""
    keys = {"d": "d", "L": "L", "out_ln": "noLN", "residual": "noskip"}
    parts = [arch]
    for item in overrides:
        k, _, v = item.partition("=")
        if k in ("d", "L"):
            parts.append(f"{k}{v}")
        elif k in ("out_ln", "residual") and v.lower() in ("false", "0", "no", "off"):
            parts.append(keys[k])
    return "-".join(parts)


def _fit_save_epochs(items: tuple[str, ...], epochs: int) -> list[str]:
    """Checkpoint epochs past a scaled-down run's end are dropped (a profile shortens runs)."""
    out = []
    for item in items:
        if item.startswith("save_epochs="):
            kept = [e for e in item.split("=", 1)[1].split(",") if e.strip() and int(e) <= epochs]
            item = f"save_epochs={','.join(kept)}"
        out.append(item)
    return out


def expand(name: str, *, profile: str = "cpu", results: str = "results", overrides: tuple[str, ...] = ()) -> list[TrainConfig]:
    """Every run config of setting ``name`` under ``profile`` (validated; nothing is trained)."""
    setting = SETTINGS.get(name)
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    prof = PROFILES[profile]
    epochs = prof.epochs(setting.epochs)
    if profile == "smoke" and setting.epochs <= 5:
        epochs = 2
    cfgs = []
    for g in setting.groups:
        for rule in g.rules:
            for seed in g.seeds:
                items = [*prof.overrides, f"epochs={epochs}", f"arch={g.arch}", *setting.overrides,
                         *_fit_save_epochs(g.overrides, epochs), f"arch_label={arch_tag(g.arch, g.overrides)}",
                         f"rule={rule}", f"seed={seed}", f"results={results}", f"setting={name}", "progress=false", *overrides]
                cfgs.append(C.apply_overrides(TrainConfig(), items))
    return cfgs
