"""The experiment registry: every setting of the study (the seed inventory's "By Experiment
Setting" table, docs/science.md §5) declared as data — rules × architecture variants × seeds × epochs ×
options — and profiles that scale data and epochs to a machine, never the definitions.

A setting expands, under a profile, into the list of run configs a sweep trains; the run folders
are ``<results>/<setting>/<rule>__<arch>__s<seed>/``. Settings whose runs differ in architecture
options (the depth sweep's L, the ablations' flags) name the variant in ``arch_tag`` so that every
run has its own folder: ``resmlp-d512-L8``.
"""

from __future__ import annotations

from dataclasses import dataclass

from creditaudit import config
from creditaudit.config import TrainConfig
from creditaudit.errors import ConfigError
from creditaudit.registry import Registry
from creditaudit.runs.pairing import BASELINE_RULE, CONTROLS, experiment_key

SEEDS3 = (42, 123, 456)
# EP's six-seed replication: seeds of its own, so that none of its runs repeats a main-audit EP run.
SEEDS6 = (789, 1011, 1213, 1415, 1617, 1819)


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
    baseline: str | None = (
        BASELINE_RULE  # the D3 baseline its runs are paired with (None: they are baselines)
    )
    study: bool = (
        True  # one of the study's settings (False: creditaudit's own additions, run by name)
    )

    @property
    def n_runs(self) -> int:
        return sum(len(g.rules) * len(g.seeds) for g in self.groups)


@dataclass(frozen=True)
class Profile:
    """How a machine runs the study: data, sizes and epochs, never definitions — one registry for
    every command. A profile serves the commands named in ``commands``:

    - ``sweep``: every run of a setting, with the profile's data (``overrides``) and epochs;
    - ``audit``: ``audit_rules`` × 3 seeds and the frozen-blocks baseline, as the main audit's
      setting under the profile ``base`` (its data and epochs × ``epoch_factor``), with the training
      recipe ``recipe`` on top and the runs in setting ``audit_setting``;
    - ``exploit``: the snapshot-exploitability study with the protocol's fields set by ``exploit``
      (key=value) and seeds ``exploit_seeds``.
    """

    name: str
    summary: str
    commands: frozenset[str]
    overrides: tuple[str, ...] = ()  # data and sizes, for every run
    epoch_scale: float = 1.0  # these four: how the study's epochs scale (see epochs())
    keep_upto: int = 5
    short_epochs: int = 0
    min_epochs: int = 1
    arch_overrides: tuple[
        tuple[str, tuple[str, ...]], ...
    ] = ()  # (arch, key=value…) for that architecture's runs only
    base: str = ""  # an audit profile's data and epochs come from this sweep profile
    epoch_factor: int = 1  # an audit profile trains its base's epochs × this (see epochs())
    audit_rules: tuple[str, ...] = ()
    recipe: tuple[str, ...] = ()  # training-recipe overrides of an audit profile's runs
    audit_setting: str = "main_audit"
    exploit: tuple[str, ...] = ()  # exploit-protocol key=value overrides
    exploit_seeds: tuple[int, ...] = SEEDS3
    readings: tuple[
        tuple[str, str, str], ...
    ] = ()  # (arch, read as, why): the profile's data need another reading of arch

    def arch(self, arch: str) -> str:
        """The architecture a setting's ``arch`` trains as under this profile (itself, or its reading
        of the profile's data: smallcnn1d for smallcnn on 1-D signals)."""
        return next((read for a, read, _ in self.readings if a == arch), arch)

    def epochs(self, study_epochs: int) -> int:
        """How many epochs a run trains under this profile, for a setting of ``study_epochs``
        (the study's, the paper profile's) — the one rule, for sweeps and audits alike:

        - a setting of at most ``keep_upto`` epochs is short on purpose (early_checkpoints keeps a
          checkpoint after each): it trains ``short_epochs``, or its own epochs when that is 0;
        - any other trains ``round(study_epochs × epoch_scale)``, at least ``min_epochs``;
        - an audit profile with a ``base`` scales as its base does, then × ``epoch_factor``.

        A profile's ``recipe`` may still set ``epochs=`` (mode1's 16), and a user's ``epochs=``
        override comes last: both are overrides, applied after this rule."""
        scale = PROFILES.get(self.base) if self.base else self
        if study_epochs <= scale.keep_upto:
            epochs = scale.short_epochs or study_epochs
        else:
            epochs = max(scale.min_epochs, round(study_epochs * scale.epoch_scale))
        return epochs * self.epoch_factor

    def data_overrides(self, arch: str = "") -> tuple[str, ...]:
        if self.base:
            return PROFILES.get(self.base).data_overrides(arch)
        return (*self.overrides, *dict(self.arch_overrides).get(arch, ()))


SETTINGS: Registry[Setting] = Registry("setting")
PROFILES: Registry[Profile] = Registry("profile")
MAIN6 = ("bp", "fa", "dfa", "ep", "sb", "cb")
SWEEP, AUDIT, EXPLOIT = "sweep", "audit", "exploit"
# DFA's residual stream grows with the number of optimizer steps that carry an error signal, so the
# mode1 recipe buys steps on the cpu profile's data: batch 16, a constant learning rate of 1e-2, no
# weight decay (which caps the growth), 16 epochs (20,000 steps). Chosen by measurement, see docs/audit.md.
MODE1_RECIPE = (
    "batch_size=16",
    "optim.lr=1e-2",
    "optim.schedule=constant",
    "optim.weight_decay=0",
    "epochs=16",
)
for _p in (
    Profile(
        "paper",
        "the study: CIFAR-10, full training set, the study's epochs (a GPU)",
        frozenset({SWEEP, AUDIT, EXPLOIT}),
        ("dataset=cifar10",),
        1.0,
        audit_rules=MAIN6,
        exploit=(
            "name=paper",
            "dataset=cifar10",
            "train_subset=0",
            "epochs=100",
            "early_epoch=5",
            "fit_steps=10000",
        ),
    ),
    # vit_mini's cost is set by its token count: patch 7 cuts a 28×28 image into 16 patches (17 tokens
    # with cls) where patch 4 gives 49, 2.6× faster per step on one CPU thread (docs/performance.md).
    Profile(
        "cpu",
        "Fashion-MNIST, 20k examples, 6% of the study's epochs (100 -> 6, 30 -> 2), vit_mini patch 7",
        frozenset({SWEEP}),
        ("dataset=fashion_mnist", "train_subset=20000"),
        0.06,
        min_epochs=2,
        arch_overrides=(("vit_mini", ("patch=7",)),),
    ),
    Profile(
        "smoke",
        "scikit-learn digits, 1 epoch (5-epoch settings keep 2), d=32: seconds, for tests",
        frozenset({SWEEP, EXPLOIT}),
        ("dataset=digits", "train_subset=0", "d=32"),
        0.0,
        short_epochs=2,
        min_epochs=1,
        arch_overrides=(("smallcnn", ("channels=4,8,8",)),),
        exploit_seeds=(42, 123),
        exploit=(
            "name=smoke",
            "dataset=digits",
            "train_subset=0",
            "d=32",
            "L=2",
            "epochs=2",
            "early_epoch=1",
            "batch_size=64",
            "fit_steps=20",
            "fit_batch_size=64",
            "eval_n=128",
            "rho_dirs=4",
            "step_batch_size=64",
        ),
    ),
    Profile(
        "default",
        "the cpu profile's data and epochs (Fashion-MNIST, 20k examples, 6 epochs): the main audit in "
        "about 7 minutes on 2 cores; the exploit study's default",
        frozenset({AUDIT, EXPLOIT}),
        base="cpu",
        audit_rules=MAIN6,
    ),
    Profile(
        "double",
        "the default audit with twice the epochs (the verdicts' stability check)",
        frozenset({AUDIT}),
        base="cpu",
        epoch_factor=2,
        audit_rules=MAIN6,
    ),
    # mnist1d at the study's epochs, sized by measurement (bp, fa, dfa × 3 seeds, 100 epochs, 2 cores):
    # at the package's 5,000 signals FA is +1.3 ± 1.2 pp over its frozen baseline (D3 fires for 2 of 3
    # seeds), at 10,000 +2.2 ± 0.7 (1 of 3), at 20,000 +5.5 ± 1.1 (none) with DFA at -32.5 ± 14.1 and
    # D1 firing for 3 of 3 (docs/audit.md). SmallCNN and ViT-Mini read images; on the 1-D signals the
    # cross-architecture setting trains their 1-D readings of the same designs.
    Profile(
        "mnist1d",
        "MNIST-1D, 20,000 generated signals (16k train / 4k test), the study's epochs: the study's "
        "findings on a laptop (FA above its frozen baseline, DFA below it, firing D1); smallcnn and vit_mini "
        "as their 1-D readings",
        frozenset({SWEEP, AUDIT}),
        ("dataset=mnist1d", "train_subset=0", "mnist1d_signals=20000"),
        1.0,
        audit_rules=MAIN6,
        readings=tuple(
            (arch, f"{arch}1d", f"{arch} reads images (C, H, W); mnist1d's signals are 1-D")
            for arch in ("smallcnn", "vit_mini")
        ),
    ),
    Profile(
        "mode1",
        "bp, fa, dfa on the cpu profile's data with a recipe of many steps (batch 16, lr 1e-2 constant, "
        "no weight decay, 16 epochs) where DFA shows Mode 1(a) and 1(b) on a CPU",
        frozenset({AUDIT}),
        base="cpu",
        audit_rules=("bp", "fa", "dfa"),
        recipe=MODE1_RECIPE,
        audit_setting="mode1",
    ),
):
    if _p.base and PROFILES.get(_p.base).base:  # Profile.epochs goes one level down, no further
        raise ValueError(f"profile {_p.name}: its base {_p.base} must not have a base itself")
    PROFILES.add(_p.name, _p, _p.summary)


def get_profile(name: str, command: str = SWEEP) -> Profile:
    """The profile ``name``, which must serve ``command`` (sweep, audit or exploit); an unknown or
    another command's name is refused with the names ``command`` takes, and no others."""
    names = profile_names(command)
    if name not in PROFILES:
        raise ConfigError(
            f"unknown profile {name!r}; {command} takes one of {', '.join(names)} (see `creditaudit list`)"
        )
    p = PROFILES.get(name)
    if command not in p.commands:
        raise ConfigError(
            f"profile {name!r} is not one of {command}'s; choose one of {', '.join(names)}"
        )
    return p


def profile_names(command: str) -> list[str]:
    return [n for n in PROFILES.in_order() if command in PROFILES.get(n).commands]


def _add(setting: Setting) -> None:
    SETTINGS.add(setting.name, setting, setting.summary)


D512 = ("d=512",)
for s in (
    Setting(
        "main_audit", "6 methods × 3 seeds on the d=256 ResMLP (Table 1)", 100, (Group(MAIN6),)
    ),
    Setting(
        "cross_arch",
        "DFA/BP/EP/SB/CB on SmallCNN and DFA on ViT-Mini (paper §5.2)",
        100,
        (Group(("dfa", "bp", "ep", "sb", "cb"), arch="smallcnn"), Group(("dfa",), arch="vit_mini")),
    ),
    Setting(
        "depth_sweep",
        "DFA + FA at d=512, L in {2,4,6,8,12} (Appendix H)",
        100,
        tuple(Group(("dfa", "fa"), seeds=(42,), overrides=(*D512, f"L={L}")) for L in (2, 6, 8, 12))
        + (
            Group(("dfa",), overrides=(*D512, "L=4")),
            Group(("fa",), seeds=(42,), overrides=(*D512, "L=4")),
        ),
    ),
    Setting(
        "frozen_baselines",
        "BP/DFA × shallow/frozen × 3 seeds (diagnostic (d))",
        100,
        (Group(("bp_shallow", "bp_frozen", "dfa_shallow", "dfa_frozen")),),
        baseline=None,
    ),
    Setting(
        "penalty_rescue",
        "DFA/FA/SB/CB with penalty lam=1e-2 (paper §5.1, paper §4.2)",
        30,
        (Group(("dfa", "fa", "sb", "cb"), overrides=("lam=1e-2",)),),
    ),
    Setting(
        "dfa_pen_30ep_diag",
        "DFA + penalty lam=1e-2, 30 epochs, 3 seeds, re-run with per-epoch trajectories and ρ "
        "every 10 epochs (the study's DFA+pen diagnostics runs)",
        30,
        (Group(("dfa",), overrides=("lam=1e-2", "full_every=10", "trajectory=true")),),
    ),
    Setting(
        "penalty_1e-4",
        "DFA + FA at the weaker penalty lam=1e-4 (paper §5.1)",
        30,
        (Group(("dfa", "fa"), overrides=("lam=1e-4",)),),
    ),
    Setting(
        "penalty_1e-1",
        "DFA at the stronger penalty lam=1e-1",
        30,
        (Group(("dfa",), seeds=(42,), overrides=("lam=1e-1",)),),
    ),
    Setting(
        "bp_penalty",
        "BP + penalty lam=1e-2: the capacity-cost control (paper §5.2)",
        30,
        (Group(("bp",), overrides=("lam=1e-2",)),),
    ),
    Setting(
        "matched_30ep",
        "BP/DFA/FA without penalty at 30 epochs (paper §5.2 matched controls)",
        30,
        (Group(("bp", "dfa", "fa")),),
    ),
    Setting(
        "sbcb_vanilla_30ep",
        "SB and CB without penalty at 30 epochs (Appendix J)",
        30,
        (Group(("sb", "cb"), seeds=(42,)),),
    ),
    Setting(
        "no_terminal_ln",
        "DFA on the same backbone without the terminal LN (paper §3.2)",
        100,
        (Group(("dfa",), overrides=("out_ln=false",)),),
    ),
    Setting(
        "no_residual",
        "DFA on the same backbone without the skip path (paper §3.1 falsification)",
        100,
        (Group(("dfa",), overrides=("residual=false",)),),
    ),
    Setting(
        "random_labels",
        "DFA/FA/SB/CB/EP with i.i.d. random training labels (paper §3.1)",
        100,
        (Group(("dfa", "fa", "sb", "cb", "ep"), seeds=(42,), overrides=("random_labels=true",)),),
    ),
    Setting(
        "early_checkpoints",
        "DFA + FA for 5 epochs, a checkpoint after each (paper §4.1, Mode 2)",
        5,
        (Group(("dfa", "fa"), overrides=("save_epochs=1,2,3,4,5",)),),
    ),
    Setting(
        "snapshot_evolution",
        "DFA with the per-epoch h_L, g_L trajectory, ρ every 10 epochs (paper §3.1)",
        100,
        (Group(("dfa",), overrides=("full_every=10", "trajectory=true")),),
    ),
    Setting(
        "dfa_pen_100ep",
        "DFA + penalty lam=1e-2 over 100 epochs (long-horizon rescue)",
        100,
        (Group(("dfa",), overrides=("lam=1e-2",)),),
    ),
    Setting("ep_6seeds", "EP replicated over 6 seeds", 100, (Group(("ep",), seeds=SEEDS6),)),
):
    _add(s)


# The rules creditaudit has beyond the study's six: the field's libraries' families and the study's
# own variants that its registry does not train.
EXTENDED_RULES = (
    "fa_layerwise",
    "vec",
    "usf",
    "frsf",
    "brsf",
    "kp",
    "drtp",
    "pepita",
    "dtp",
    "fwdgrad",
)
_add(
    Setting(
        "extended_rules",
        "every rule beyond the study's six × 3 seeds on the d=256 ResMLP (not in the study)",
        100,
        (Group(EXTENDED_RULES),),
        study=False,
    )
)


def study_settings() -> list[str]:
    """The study's settings in declaration order (what ``sweep all`` trains and the plan counts)."""
    return [n for n in SETTINGS.in_order() if SETTINGS.get(n).study]


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


def expand(
    name: str, *, profile: str = "cpu", results: str = "results", overrides: tuple[str, ...] = ()
) -> list[TrainConfig]:
    """Every run config of setting ``name`` under ``profile`` (checked: ``config.checked``; nothing
    is trained)."""
    setting = SETTINGS.get(name)
    prof = get_profile(profile, SWEEP)
    epochs = prof.epochs(setting.epochs)
    cfgs = []
    for g in setting.groups:
        arch = prof.arch(g.arch)
        for rule in g.rules:
            for seed in g.seeds:
                items = [
                    *prof.data_overrides(arch),
                    f"epochs={epochs}",
                    f"arch={arch}",
                    *setting.overrides,
                    *_fit_save_epochs(g.overrides, epochs),
                    f"arch_label={arch_tag(arch, g.overrides)}",
                    f"rule={rule}",
                    f"seed={seed}",
                    f"results={results}",
                    f"setting={name}",
                    "progress=false",
                    *overrides,
                ]
                cfgs.append(config.checked(TrainConfig(), items))
    return cfgs


def profile_notes(name: str, profile: str) -> list[str]:
    """One line per group of setting ``name`` that ``profile`` trains on another reading of its
    architecture, and why (a sweep and a plan print them)."""
    prof = get_profile(profile, SWEEP)
    why = {arch: reason for arch, _, reason in prof.readings}
    return [
        f"{name}: {', '.join(g.rules)} on {g.arch} ({len(g.rules) * len(g.seeds)} runs) train as {prof.arch(g.arch)} "
        f"under profile {profile}: {why[g.arch]}"
        for g in SETTINGS.get(name).groups
        if g.arch in why
    ]


# ---------------------------------------------------------------------------------------------
# Baselines a sweep trains with --with-baselines
# ---------------------------------------------------------------------------------------------
def baselines(
    cfgs: list[TrainConfig], *, profile: str = "cpu", overrides: tuple[str, ...] = ()
) -> list[TrainConfig]:
    """The D3 baselines that the runs ``cfgs`` need and ``cfgs`` do not already hold.

    A run's baseline (its setting's ``baseline`` rule, ``bp_frozen``) is the run of the same
    experiment (``creditaudit.runs.pairing``): where the registry's ``frozen_baselines`` setting
    holds it under this profile, that run is taken (trained once, shared by every setting that
    needs it); otherwise it is an *added control* in ``<results>/controls/``, named
    ``<baseline>__<arch variant>-ep<epochs>[-randlabels]__s<seed>`` and shared the same way.
    """
    from creditaudit.rules import parse_rule_name

    def key(c: TrainConfig, rule: str) -> tuple[str, str, str]:
        return experiment_key(config.to_dict(c)), rule, c.results

    have = {key(c, c.rule) for c in cfgs}
    shared: dict[tuple[str, str, str], TrainConfig] = {}
    for results in {c.results for c in cfgs}:
        for c in expand("frozen_baselines", profile=profile, results=results, overrides=overrides):
            shared.setdefault(key(c, c.rule), c)
    out: dict[tuple[str, str, str], TrainConfig] = {}
    for c in cfgs:
        rule = SETTINGS.get(c.setting).baseline if c.setting in SETTINGS else BASELINE_RULE
        if rule is None or parse_rule_name(c.rule)[1] is not None:
            continue  # the baselines themselves need none
        k = key(c, rule)
        if k not in have and k not in out:
            out[k] = shared.get(k) or control_config(c, rule)
    by_path: dict[str, tuple[str, str, str]] = {}
    for k, c in out.items():
        path = str(config.run_path(c))
        if by_path.setdefault(path, k) != k:
            raise ConfigError(
                f"two different baselines would share the folder {path}; name the runs apart (arch_label=…)"
            )
    return list(out.values())


def control_config(run: TrainConfig, rule: str) -> TrainConfig:
    """The ``rule`` baseline of ``run``'s experiment, as an added control: credit-assignment fields
    reset, what is only logged (trajectories, extra checkpoints, full probes) dropped."""
    cfg = config.copy_config(run)
    cfg.rule, cfg.rule_opts, cfg.plugins, cfg.local_rule, cfg.lam, cfg.save_epochs = (
        rule,
        {},
        (),
        "inner",
        0.0,
        (),
    )
    cfg.diag.trajectory, cfg.diag.full_every = False, 0
    cfg.setting = CONTROLS
    tags = [run.arch_label or run.arch, f"ep{run.epochs}"] + (
        ["randlabels"] if run.data.random_labels else []
    )
    cfg.arch_label = "-".join(tags)
    return config.checked(cfg)


# ---------------------------------------------------------------------------------------------
# The audit: a profile's rules × seeds and the frozen-blocks baseline
# ---------------------------------------------------------------------------------------------
def audit_configs(
    rules: list[str],
    *,
    profile: str = "default",
    seeds: tuple[int, ...] = SEEDS3,
    baseline: str | None = BASELINE_RULE,
    results: str = "results",
    setting: str | None = None,
    overrides: tuple[str, ...] = (),
) -> list[TrainConfig]:
    """The runs of ``creditaudit audit``: every rule × seed and the baseline × seed, as the main
    audit's setting under ``profile`` (its data, epochs and recipe; ``setting`` defaults to the
    profile's); the user's ``overrides`` come last. EP first (the longest)."""
    prof = get_profile(profile, AUDIT)
    epochs = prof.epochs(SETTINGS.get("main_audit").epochs)
    base = [
        *prof.data_overrides(),
        f"epochs={epochs}",
        f"results={results}",
        f"setting={setting or prof.audit_setting}",
        "progress=false",
        *prof.recipe,
        *overrides,
    ]
    names = list(dict.fromkeys([*rules, *([baseline] if baseline else [])]))
    cfgs = [
        config.checked(TrainConfig(), [*base, f"rule={r}", f"seed={s}"])
        for r in names
        for s in seeds
    ]
    cost = {"ep": 0, "cb": 1, "sb": 2, "vec": 3}
    return sorted(cfgs, key=lambda c: cost.get(c.rule.split("_")[0], 9))
