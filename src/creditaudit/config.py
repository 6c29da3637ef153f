"""Typed run configuration (CleanRL's ``Args`` style) and ``key=value`` overrides.

A :class:`TrainConfig` is a tree of dataclasses; every field carries a one-line help text in its
metadata, which ``creditaudit train --help`` prints. An override names a field by its dotted path
(``model.d=512``) or, when unambiguous, by its leaf name (``d=512``); values are parsed by the
field's type. The resolved config is written into every run folder as JSON and read back with
:func:`from_dict`; :func:`validate` refuses what a run cannot start with, each in one line naming the
field (a :class:`~creditaudit.errors.ConfigError`): among others a number that is not finite (JSON
has no inf or nan), a seed outside 0..:data:`SEED_MAX`, a ``setting`` or ``arch_label`` that cannot
name a folder, an empty ``results``. No ``exec``-style configs.

A config is checked once, where it enters — the command line and ``creditaudit.api``, a sweep's or
an audit's expansion (``experiments``), and the trainer and job runners for a config built in
Python — by :func:`checked`, which freezes it: every layer inside takes it as it is. A worker
process rebuilds it with :func:`from_checked_dict`, which imports its rule files (loading code, not
checking it again).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from creditaudit import typedconfig
from creditaudit.data.base import DataConfig
from creditaudit.diagnostics.probe import DiagConfig
from creditaudit.errors import ConfigError
from creditaudit.models.base import ModelConfig


@dataclass
class OptimConfig(typedconfig.Config):
    """The study's recipe: AdamW with a cosine schedule, one optimizer state per block."""

    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate (peak of the schedule)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW decoupled weight decay"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    schedule: str = field(
        default="cosine",
        metadata={"help": "learning-rate schedule over all steps: cosine (to 0) | constant"},
    )


@dataclass
class TrainConfig(typedconfig.Config):
    """One training run: which rule trains which architecture on which data, and how."""

    rule: str = field(
        default="bp",
        metadata={
            "help": (
                "credit-assignment rule (see `creditaudit list`); suffix _frozen or _shallow for "
                "the baselines; or the path of a .py file registering your own rule"
            )
        },
    )
    plugins: tuple[str, ...] = field(
        default=(),
        metadata={
            "help": "Python files to import first, each registering rules of your own (absolute paths are stored)"
        },
    )
    arch: str = field(default="resmlp", metadata={"help": "architecture (see `creditaudit list`)"})
    seed: int = field(
        default=42,
        metadata={
            "help": "seed of the model init, the rule's random matrices, data order and augmentation (0..2**63-1)"
        },
    )
    epochs: int = field(
        default=100,
        metadata={"help": "training epochs (the study: 100 for the audit, 30 for penalty studies)"},
    )
    batch_size: int = field(default=128, metadata={"help": "training mini-batch size"})
    lam: float = field(
        default=0.0,
        metadata={
            "help": (
                "per-block penalty lam·mean_b||f_l||² on each residual branch output, for every "
                "rule (bp: autograd of CE + penalty); refused for the _frozen/_shallow "
                "baselines, whose blocks do not train"
            )
        },
    )
    local_rule: str = field(
        default="inner",
        metadata={
            "help": (
                "local update of each block and the embedding: inner | shift(eta) | cosine "
                "(docs/science.md §1); bp trains end to end and refuses anything but inner"
            )
        },
    )
    device: str = field(
        default="auto",
        metadata={
            "semantic": False,
            "help": "auto (CUDA when present, else CPU) | cpu | cuda | cuda:N",
        },
    )
    threads: int = field(
        default=0, metadata={"semantic": False, "help": "torch CPU threads (0 = torch's default)"}
    )
    results: str = field(
        default="results",
        metadata={
            "semantic": False,
            "help": "results folder; the run lives in <results>/<setting>/<rule>__<arch>__s<seed>/",
        },
    )
    setting: str = field(
        default="adhoc",
        metadata={
            "semantic": False,
            "help": "experiment-setting name, the first level of the results folder",
        },
    )
    arch_label: str = field(
        default="",
        metadata={
            "semantic": False,
            "help": (
                "the architecture's name in the run folder (default: arch); sweeps name "
                "variants, e.g. resmlp-d512-L8"
            ),
        },
    )
    save_epochs: tuple[int, ...] = field(
        default=(),
        metadata={
            "help": "epochs after which to keep a checkpoint (e.g. 1,2,3); the last epoch's is always kept"
        },
    )
    eval_batch_size: int = field(
        default=1000,
        metadata={
            "semantic": False,
            "help": "batch size for test-set evaluation (no effect on results)",
        },
    )
    progress: bool = field(
        default=True,
        metadata={
            "semantic": False,
            "help": "show a progress bar with live loss and accuracy (only on a terminal)",
        },
    )
    logger: str = field(
        default="none",
        metadata={
            "semantic": False,
            "help": (
                "experiment tracker that also receives every epoch's metrics and the config: "
                "none | tensorboard | mlflow | wandb (optional extras; the run folder stays the "
                "record)"
            ),
        },
    )
    logger_dir: str = field(
        default="",
        metadata={
            "semantic": False,
            "help": (
                "where the tracker writes: tensorboard's log dir (default "
                "<results>/_tensorboard), mlflow's tracking URI (default $MLFLOW_TRACKING_URI, "
                "else the local store <results>/_mlruns) or wandb's local dir (default "
                "<results>/_wandb)"
            ),
        },
    )
    rule_opts: dict = field(
        default_factory=dict,
        metadata={
            "help": (
                "the rule's own options, set as <rule>.<option>=value or <option>=value (listed "
                "by `creditaudit list`)"
            )
        },
    )
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    diag: DiagConfig = field(default_factory=DiagConfig)


# A run seed is a signed 64-bit integer's non-negative half: torch's and numpy's generators take it,
# and so do Parquet's int64 columns (creditaudit export); negative seeds would not name a folder.
SEED_MAX = 2**63 - 1

# Alternative names a researcher will type.
ALIASES = {
    "width": "model.d",
    "depth": "model.L",
    "dataset": "data.dataset",
    "lr": "optim.lr",
    "wd": "optim.weight_decay",
}
HELP_HINT = "`creditaudit train --help` lists every field."


# ---------------------------------------------------------------------------------------------
# key=value overrides (the generic engine: creditaudit.typedconfig), checked once where they enter
# ---------------------------------------------------------------------------------------------
def apply_overrides(cfg: TrainConfig, overrides: Iterable[str]) -> TrainConfig:
    """A copy of ``cfg`` with ``key=value`` strings applied, its rule files imported (``rule=path.py``
    becomes that file's rule name), options of its rule set, and validated: the one way to apply
    overrides to a run's config. The copy is editable; :func:`checked` freezes it for a run."""
    items = list(overrides)
    for item in items:
        if item.split("=", 1)[0].strip() == "rule_opts":
            raise ConfigError("set rule options one by one, as <rule>.<option>=value")
    # Keys no field has are the rule's options, known once its file is imported.
    options: list[tuple[str, str, ConfigError]] = []
    out = typedconfig.copy_with(
        cfg,
        items,
        aliases=ALIASES,
        unknown=lambda _cfg, key, text, exc: options.append((key, text, exc)),
        example="rule=dfa epochs=3",
        help_hint=HELP_HINT,
    )
    out = _with_rule_files(out)
    for key, text, exc in options:
        set_rule_option(out, key, text, exc)
    validate(out)
    return out


def checked(cfg: TrainConfig, overrides: Iterable[str] = ()) -> TrainConfig:
    """``cfg`` as it goes into a run: :func:`apply_overrides` (overrides applied, rule files
    imported, validated), frozen, so that no layer inside checks it again or changes it. A config
    this froze, with no overrides, comes back as it is."""
    items = tuple(overrides)
    if typedconfig.is_frozen(cfg) and not items:
        return cfg
    return typedconfig.freeze(apply_overrides(cfg, items))


def from_checked_dict(data: dict) -> TrainConfig:
    """A config :func:`checked` in another process, from its :func:`to_dict` form (how a sweep's
    worker receives its runs), frozen again: its rule files are imported — loading code, which a
    new process has not done —, nothing is checked again."""
    cfg = from_dict(data)
    load_plugins(cfg)
    return typedconfig.freeze(cfg)


def load_plugins(cfg: TrainConfig) -> None:
    """Import the rule files a checked config names (``plugins``, absolute paths); ``cfg`` is left
    as it is."""
    from creditaudit.rules import load_rule_file

    for path in cfg.plugins:
        load_rule_file(path)


def _with_rule_files(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with its rule files imported and recorded by absolute path in ``plugins`` (a worker
    process imports them from there); ``rule=path.py`` becomes the name of the one rule that file
    registers. A new config: ``cfg`` is left as it is."""
    from pathlib import Path

    from creditaudit.rules import load_rule_file

    plugins = tuple(str(Path(p).expanduser().resolve()) for p in cfg.plugins)
    for path in plugins:
        load_rule_file(path)
    rule = cfg.rule
    if rule.endswith(".py"):
        path = str(Path(rule).expanduser().resolve())
        names = load_rule_file(path)
        if len(names) != 1:
            raise ConfigError(
                f"{cfg.rule} registers several rules ({', '.join(names)}): say rule=NAME plugins={cfg.rule}"
            )
        rule = names[0]
        if path not in plugins:
            plugins = (*plugins, path)
    return dataclasses.replace(cfg, rule=rule, plugins=plugins)


def set_rule_option(cfg: TrainConfig, key: str, text: str, unknown: ConfigError) -> None:
    """``ep.beta=0.2`` or ``beta=0.2`` (when the run's rule is ep) -> ``cfg.rule_opts["beta"]``, in
    place (on the copy :func:`apply_overrides` makes)."""
    from creditaudit.rules import RULES, parse_rule_name

    base, _ = parse_rule_name(cfg.rule)
    prefix, _, option = key.rpartition(".")
    if prefix and prefix != base:
        if prefix in RULES:
            raise ConfigError(
                f"{key}={text}: an option of rule {prefix!r}, but this run's rule is {cfg.rule!r}"
            )
        raise unknown
    fields = {f.name for f in dataclasses.fields(RULES.get(base).Options)}
    if option not in fields:
        if prefix:
            known = ", ".join(sorted(fields)) or "none"
            raise ConfigError(f"rule {base!r} has no option {option!r} (its options: {known})")
        raise unknown
    cfg.rule_opts[option] = text


def resolve_rule_options(cfg: TrainConfig) -> TrainConfig:
    """A copy whose ``rule_opts`` holds every option of the rule, typed, defaults filled in, and
    whose model config names its terminal norm and skip path (``out_ln``, ``residual``)."""
    from creditaudit.models.base import arch_shape
    from creditaudit.rules import rule_options

    out = copy_config(cfg)
    out.rule_opts = dataclasses.asdict(rule_options(cfg.rule, cfg.rule_opts))
    # The architecture's own terminal-norm and skip-path defaults, written out (width and depth
    # stay as given: run folders name them by arch_label).
    shape = arch_shape(cfg.arch, cfg.model)
    out.model.out_ln, out.model.residual = shape.out_ln, shape.residual
    return out


# ---------------------------------------------------------------------------------------------
# Validation, serialisation
# ---------------------------------------------------------------------------------------------
def validate(cfg: TrainConfig) -> None:
    """Check values a run cannot start with; names are checked against the registries (a rule of a
    plugin file is known once its file is imported). Changes nothing."""
    from creditaudit.data import DATASETS
    from creditaudit.models import ARCHS
    from creditaudit.rules import parse_rule_name
    from creditaudit.runs.folder import check_name
    from creditaudit.training.objective import parse_local_update

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    typedconfig.check_finite(
        cfg
    )  # inf and nan have no JSON form: config.json could not record them
    base, _ = parse_rule_name(cfg.rule)  # raises with the list of rules
    from creditaudit.rules import rule_options

    typedconfig.check_finite(
        rule_options(cfg.rule, cfg.rule_opts), f"{base}."
    )  # raises on an unknown, badly typed or non-finite option
    if cfg.arch not in ARCHS:
        raise ConfigError(ARCHS.unknown_message(cfg.arch))
    if cfg.data.dataset not in DATASETS:
        raise ConfigError(DATASETS.unknown_message(cfg.data.dataset))
    parse_local_update(cfg.local_rule)
    need(cfg.epochs >= 1, f"epochs must be >= 1 (got {cfg.epochs})")
    need(cfg.batch_size >= 1, f"batch_size must be >= 1 (got {cfg.batch_size})")
    need(cfg.eval_batch_size >= 1, f"eval_batch_size must be >= 1 (got {cfg.eval_batch_size})")
    need(cfg.lam >= 0, f"lam must be >= 0 (got {cfg.lam})")
    need(cfg.threads >= 0, f"threads must be >= 0 (got {cfg.threads})")
    need(cfg.optim.lr > 0, f"lr must be > 0 (got {cfg.optim.lr})")
    need(cfg.optim.weight_decay >= 0, f"weight_decay must be >= 0 (got {cfg.optim.weight_decay})")
    need(
        0 <= cfg.optim.beta1 < 1 and 0 <= cfg.optim.beta2 < 1, "beta1 and beta2 must lie in [0, 1)"
    )
    need(
        cfg.optim.schedule in ("cosine", "constant"),
        f"schedule must be cosine or constant (got {cfg.optim.schedule!r})",
    )
    need(
        cfg.device == "auto"
        or cfg.device == "cpu"
        or cfg.device.startswith("cuda")
        or cfg.device == "mps",
        f"device must be auto, cpu, cuda, cuda:N or mps (got {cfg.device!r})",
    )
    need(
        all(1 <= e <= cfg.epochs for e in cfg.save_epochs),
        f"save_epochs must lie in 1..epochs (got {cfg.save_epochs})",
    )
    dg = cfg.diag
    need(
        dg.eval_n >= 1 and dg.rho_n >= 1 and dg.rho_dirs >= 1,
        "eval_n, rho_n and rho_dirs must be >= 1",
    )
    need(dg.every >= 0 and dg.full_every >= 0, "every and full_every must be >= 0")
    need(dg.rho_eps > 0 and dg.nudge_eta > 0, "rho_eps and nudge_eta must be > 0")
    need(
        dg.stab_batches >= 2 and dg.stab_batch_size >= 1,
        "stab_batches must be >= 2 and stab_batch_size >= 1",
    )
    need(cfg.model.L is None or cfg.model.L >= 0, f"L must be >= 0 (got {cfg.model.L})")
    need(cfg.model.d is None or cfg.model.d >= 1, f"d must be >= 1 (got {cfg.model.d})")
    need(
        0 <= cfg.seed <= SEED_MAX,
        f"seed={cfg.seed}: must lie in 0..{SEED_MAX} (a signed 64-bit integer, "
        "what every random generator and the results table take; it also names the run folder)",
    )
    for name in ("results", "data.data_dir", "logger_dir"):
        need(
            "\x00" not in typedconfig.get_path(cfg, name),
            f"{name} holds a NUL character, which no path can hold",
        )
    need(
        bool(cfg.results.strip()),
        "results= is empty: name the results folder, e.g. results=results "
        "(runs go to <results>/<setting>/<rule>__<arch>__s<seed>)",
    )
    need(
        "__" not in cfg.setting,
        f"setting={cfg.setting!r}: a setting name must not contain '__' "
        "(it separates the parts of a run folder's name); use '_' or '-'",
    )
    check_name(
        "setting", cfg.setting
    )  # a valid folder name: not empty, no '/', not hidden, not too long
    if cfg.arch_label:
        check_name("arch_label", cfg.arch_label)
    run_path(cfg)  # the run folder's name as a whole fits the file system
    cfg.data.validate()
    from creditaudit.trackers import check_logger

    check_logger(
        cfg.logger, cfg.logger_dir
    )  # an unknown logger, or its extra not installed: one line naming the pip install
    check_effective(cfg)


def check_effective(cfg: TrainConfig) -> None:
    """Refuse a field this run would silently ignore (one line saying why): no field of a config
    is ever accepted without effect. ``tests/test_config_fields.py`` walks every field × rule."""
    from creditaudit.models.base import ARCH_SPECIFIC_FIELDS, arch_fields, arch_shape
    from creditaudit.rules import RULES, parse_rule_name

    base, variant = parse_rule_name(cfg.rule)
    if variant and cfg.lam:
        raise ConfigError(
            f"lam={cfg.lam:g} has no effect on {cfg.rule}: the penalty acts on the blocks' branch outputs, "
            f"which a _{variant} baseline does not train; drop lam (the baseline of a "
            "penalised run is the unpenalised one)"
        )
    if variant == "shallow" and cfg.model.L not in (None, 0):
        raise ConfigError(
            f"L={cfg.model.L} has no effect on {cfg.rule}: the _shallow variant has no blocks (L=0); drop L"
        )
    no_blocks = variant == "shallow" or cfg.model.L == 0
    if no_blocks and cfg.lam:
        raise ConfigError(
            f"lam={cfg.lam:g} has no effect with L=0: there is no block to penalise; drop lam"
        )
    if (
        no_blocks
        and cfg.model.residual is not None
        and cfg.model.residual != arch_shape(cfg.arch, ModelConfig()).residual
    ):
        raise ConfigError(
            f"residual={cfg.model.residual} has no effect on {cfg.rule} with no blocks (L=0): "
            "there is no skip path to change; drop it"
        )
    if RULES.get(base).end_to_end and cfg.local_rule.strip() != "inner":
        raise ConfigError(
            f"local_rule={cfg.local_rule} has no effect on {cfg.rule}: it trains end to end by autograd; "
            "local_rule applies to rules with a local update (fa, dfa, ep, sb, cb, …)"
        )
    default_model = ModelConfig()
    own = arch_fields(cfg.arch)
    for name in ARCH_SPECIFIC_FIELDS:
        if name not in own and getattr(cfg.model, name) != getattr(default_model, name):
            readers = ", ".join(_archs_reading(name)) or "no architecture"
            raise ConfigError(
                f"model.{name}={getattr(cfg.model, name)!r} has no effect on arch {cfg.arch!r} "
                f"(read by {readers}); drop it"
            )
    default_data = type(cfg.data)()
    if cfg.data.dataset != "mnist1d" and cfg.data.mnist1d_signals != default_data.mnist1d_signals:
        raise ConfigError(
            f"data.mnist1d_signals has no effect on dataset {cfg.data.dataset!r}: it sets mnist1d's size only"
        )
    if cfg.data.mnist1d_signals < 100:
        raise ConfigError(
            f"data.mnist1d_signals must be >= 100 (ten per class and split at least), got {cfg.data.mnist1d_signals}"
        )
    if cfg.data.dataset != "student":
        for f in dataclasses.fields(cfg.data):
            if f.name.startswith("student_") and getattr(cfg.data, f.name) != getattr(
                default_data, f.name
            ):
                raise ConfigError(
                    f"data.{f.name} has no effect on dataset {cfg.data.dataset!r}: it sets the student task only"
                )
    if not cfg.diag.enabled:
        default_diag = type(cfg.diag)()
        for f in dataclasses.fields(cfg.diag):
            if f.name != "enabled" and getattr(cfg.diag, f.name) != getattr(default_diag, f.name):
                raise ConfigError(
                    f"diag.{f.name} has no effect with diag.enabled=false: drop it or enable the diagnostics"
                )


def _archs_reading(name: str) -> list[str]:
    from creditaudit.models import ARCHS
    from creditaudit.models.base import arch_fields

    return [a for a in ARCHS.names() if name in arch_fields(a)]


def run_path(cfg: TrainConfig):
    """The run's folder: <results>/<setting>/<rule>__<arch_label or arch>__s<seed>."""
    from creditaudit.runs.folder import run_dir

    return run_dir(cfg.results, cfg.setting, cfg.rule, cfg.arch_label or cfg.arch, cfg.seed)


def semantic_diff(stored: dict, cfg: TrainConfig) -> list[str]:
    """How a config as a run folder stores it differs from ``cfg`` in what a run computes
    (``"path: old -> new"``; the fields marked ``semantic=False`` may differ)."""
    return typedconfig.diff(
        typedconfig.semantic_dict(from_dict(stored)), typedconfig.semantic_dict(cfg)
    )


def to_dict(cfg: Any) -> dict:
    return typedconfig.to_dict(cfg)


def from_dict(data: dict, cfg_type: type = TrainConfig) -> Any:
    """Rebuild a config from :func:`to_dict` output; unknown keys are an error, missing keys default."""
    return typedconfig.from_dict(data, cfg_type)


def copy_config(cfg: Any) -> Any:
    """An editable deep copy of a config (of a frozen one too)."""
    return typedconfig.copy(cfg)


def help_rows(cfg_type: type = TrainConfig) -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every field, for ``--help``."""
    return typedconfig.help_rows(cfg_type)
