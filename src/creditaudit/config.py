"""Typed run configuration (CleanRL's ``Args`` style) and ``key=value`` overrides.

A :class:`TrainConfig` is a tree of dataclasses; every field carries a one-line help text in its
metadata, which ``creditaudit train --help`` prints. An override names a field by its dotted path
(``model.d=512``) or, when unambiguous, by its leaf name (``d=512``); values are parsed by the
field's type. The resolved config is written into every run folder as JSON and read back with
:func:`from_dict`. No ``exec``-style configs.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Iterable

from creditaudit.data.base import DataConfig
from creditaudit.diagnostics.probe import DiagConfig
from creditaudit.errors import ConfigError
from creditaudit.models.base import ModelConfig



@dataclass
class OptimConfig:
    """The study's recipe: AdamW with a cosine schedule, one optimizer state per block."""

    lr: float = field(default=1e-3, metadata={"help": "AdamW learning rate (peak of the schedule)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW decoupled weight decay"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    schedule: str = field(default="cosine", metadata={"help": "learning-rate schedule over all steps: cosine (to 0) | constant"})


@dataclass
class TrainConfig:
    """One training run: which rule trains which architecture on which data, and how."""

    rule: str = field(default="bp", metadata={"help": "credit-assignment rule (see `creditaudit list`); suffix _frozen or _shallow for the baselines; or the path of a .py file registering your own rule"})
    plugins: tuple[str, ...] = field(default=(), metadata={"help": "Python files to import first, each registering rules of your own (absolute paths are stored)"})
    arch: str = field(default="resmlp", metadata={"help": "architecture (see `creditaudit list`)"})
    seed: int = field(default=42, metadata={"help": "seed of the model init, the rule's random matrices, data order and augmentation"})
    epochs: int = field(default=100, metadata={"help": "training epochs (the study: 100 for the audit, 30 for penalty studies)"})
    batch_size: int = field(default=128, metadata={"help": "training mini-batch size"})
    lam: float = field(default=0.0, metadata={"help": "per-block penalty lam·mean_b||f_l||² on each residual branch output, for every rule (bp: autograd of CE + penalty); refused for the _frozen/_shallow baselines, whose blocks do not train"})
    local_rule: str = field(default="inner", metadata={"help": "local update of each block and the embedding: inner | shift(eta) | cosine (DESIGN §1); bp trains end to end and refuses anything but inner"})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when present, else CPU) | cpu | cuda | cuda:N"})
    threads: int = field(default=0, metadata={"help": "torch CPU threads (0 = torch's default)"})
    results: str = field(default="results", metadata={"help": "results folder; the run lives in <results>/<setting>/<rule>__<arch>__s<seed>/"})
    setting: str = field(default="adhoc", metadata={"help": "experiment-setting name, the first level of the results folder"})
    arch_label: str = field(default="", metadata={"help": "the architecture's name in the run folder (default: arch); sweeps name variants, e.g. resmlp-d512-L8"})
    save_epochs: tuple[int, ...] = field(default=(), metadata={"help": "epochs after which to keep a checkpoint (e.g. 1,2,3); the last epoch's is always kept"})
    eval_batch_size: int = field(default=1000, metadata={"help": "batch size for test-set evaluation (no effect on results)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar with live loss and accuracy (only on a terminal)"})
    rule_opts: dict = field(default_factory=dict, metadata={"help": "the rule's own options, set as <rule>.<option>=value or <option>=value (listed by `creditaudit list`)"})
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    diag: DiagConfig = field(default_factory=DiagConfig)


# Alternative names a researcher will type.
ALIASES = {"width": "model.d", "depth": "model.L", "dataset": "data.dataset", "lr": "optim.lr", "wd": "optim.weight_decay"}


# ---------------------------------------------------------------------------------------------
# Walking the dataclass tree
# ---------------------------------------------------------------------------------------------
def iter_fields(cfg_type: type, prefix: str = "") -> Iterable[tuple[str, dataclasses.Field, Any]]:
    """Yield (dotted path, field, resolved type) for every leaf field of a config dataclass."""
    hints = typing.get_type_hints(cfg_type)
    for f in dataclasses.fields(cfg_type):
        tp = hints[f.name]
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from iter_fields(tp, path + ".")
        else:
            yield path, f, tp


def leaf_index(cfg_type: type = TrainConfig) -> dict[str, list[str]]:
    """Leaf name -> every dotted path that ends with it."""
    index: dict[str, list[str]] = {}
    for path, _, _ in iter_fields(cfg_type):
        index.setdefault(path.rsplit(".", 1)[-1], []).append(path)
    return index


def resolve_key(key: str, cfg_type: type = TrainConfig) -> str:
    paths = {p for p, _, _ in iter_fields(cfg_type)}
    if key in paths:
        return key
    if key in ALIASES:
        return ALIASES[key]
    matches = leaf_index(cfg_type).get(key, [])
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise ConfigError(f"config key {key!r} is ambiguous: say one of {', '.join(matches)}")
    import difflib

    close = difflib.get_close_matches(key, sorted(paths | set(leaf_index(cfg_type)) | set(ALIASES)), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ConfigError(f"unknown config key {key!r}.{hint} `creditaudit train --help` lists every field.")


def parse_value(text: str, tp: Any, key: str) -> Any:
    """Parse ``text`` as a value of type ``tp`` (bool, int, float, str, tuples, Optional)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if type(None) in args and text.strip().lower() in ("none", "null", "default", ""):
            return None
        return parse_value(text, inner[0], key)
    if origin is tuple:
        body = text.strip().strip("[]()")
        items = [t for t in (s.strip() for s in body.split(",")) if t]
        return tuple(parse_value(t, args[0], key) for t in items)
    try:
        if tp is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            value = float(text)
            if not value.is_integer():
                raise ValueError
            return int(value)
        if tp is float:
            value = float(text)
            if math.isnan(value):
                raise ValueError
            return value
        if tp is str:
            return text
    except ValueError:
        raise ConfigError(f"{key}={text!r}: expected {getattr(tp, '__name__', tp)}") from None
    raise ConfigError(f"{key}: unsupported field type {tp}")


def get_path(cfg: Any, path: str) -> Any:
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def set_path(cfg: Any, path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        cfg = getattr(cfg, part)
    setattr(cfg, leaf, value)


def field_types(cfg_type: type = TrainConfig) -> dict[str, Any]:
    return {p: tp for p, _, tp in iter_fields(cfg_type)}


def apply_overrides(cfg: TrainConfig, overrides: Iterable[str]) -> TrainConfig:
    """Apply ``key=value`` strings to a copy of ``cfg`` and validate the result."""
    cfg = copy_config(cfg)
    types_ = field_types(type(cfg))
    deferred: list[tuple[str, str, ConfigError]] = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"expected key=value, got {item!r} (e.g. rule=dfa epochs=3)")
        key, text = (s.strip() for s in item.split("=", 1))
        try:
            path = resolve_key(key, type(cfg))
        except ConfigError as exc:
            deferred.append((key, text, exc))  # perhaps an option of the rule, known once rule= is read
            continue
        if path == "rule_opts":
            raise ConfigError("set rule options one by one, as <rule>.<option>=value")
        set_path(cfg, path, parse_value(text, types_[path], path))
    load_plugins(cfg)
    for key, text, exc in deferred:
        set_rule_option(cfg, key, text, exc)
    validate(cfg)
    return cfg


def load_plugins(cfg: TrainConfig) -> None:
    """Import the config's rule files; ``rule=path.py`` becomes that file's rule name."""
    from pathlib import Path

    from creditaudit.rules import load_rule_file

    cfg.plugins = tuple(str(Path(p).expanduser().resolve()) for p in cfg.plugins)
    for path in cfg.plugins:
        load_rule_file(path)
    if cfg.rule.endswith(".py"):
        path = str(Path(cfg.rule).expanduser().resolve())
        names = load_rule_file(path)
        if len(names) != 1:
            raise ConfigError(f"{cfg.rule} registers several rules ({', '.join(names)}): say rule=NAME plugins={cfg.rule}")
        cfg.rule = names[0]
        if path not in cfg.plugins:
            cfg.plugins = (*cfg.plugins, path)


def set_rule_option(cfg: TrainConfig, key: str, text: str, unknown: ConfigError) -> None:
    """``ep.beta=0.2`` or ``beta=0.2`` (when the run's rule is ep) -> ``cfg.rule_opts["beta"]``."""
    import dataclasses as dc

    from creditaudit.rules import RULES, parse_rule_name

    base, _ = parse_rule_name(cfg.rule)
    prefix, _, option = key.rpartition(".")
    if prefix and prefix != base:
        if prefix in RULES:
            raise ConfigError(f"{key}={text}: an option of rule {prefix!r}, but this run's rule is {cfg.rule!r}")
        raise unknown
    fields = {f.name for f in dc.fields(RULES.get(base).Options)}
    if option not in fields:
        if prefix:
            known = ", ".join(sorted(fields)) or "none"
            raise ConfigError(f"rule {base!r} has no option {option!r} (its options: {known})")
        raise unknown
    cfg.rule_opts[option] = text


def resolve_rule_options(cfg: TrainConfig) -> TrainConfig:
    """A copy whose ``rule_opts`` holds every option of the rule, typed, defaults filled in, and
    whose model config names its terminal norm and skip path (``out_ln``, ``residual``)."""
    from creditaudit.rules import rule_options

    from creditaudit.models.base import arch_shape

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
    """Check values a run cannot start with; names are checked against the registries. The
    config's rule files are imported first (so ``rule=path.py`` becomes that file's rule name and
    ``plugins`` holds absolute paths): a worker process that rebuilds the config registers them too."""
    from creditaudit.data import DATASETS
    from creditaudit.models import ARCHS
    from creditaudit.rules import parse_rule_name
    from creditaudit.train.local import parse_local_rule

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    load_plugins(cfg)
    parse_rule_name(cfg.rule)  # raises with the list of rules
    from creditaudit.rules import rule_options

    rule_options(cfg.rule, cfg.rule_opts)  # raises on an unknown or badly typed option
    if cfg.arch not in ARCHS:
        raise ConfigError(ARCHS.unknown_message(cfg.arch))
    if cfg.data.dataset not in DATASETS:
        raise ConfigError(DATASETS.unknown_message(cfg.data.dataset))
    parse_local_rule(cfg.local_rule)
    need(cfg.epochs >= 1, f"epochs must be >= 1 (got {cfg.epochs})")
    need(cfg.batch_size >= 1, f"batch_size must be >= 1 (got {cfg.batch_size})")
    need(cfg.eval_batch_size >= 1, f"eval_batch_size must be >= 1 (got {cfg.eval_batch_size})")
    need(cfg.lam >= 0, f"lam must be >= 0 (got {cfg.lam})")
    need(cfg.threads >= 0, f"threads must be >= 0 (got {cfg.threads})")
    need(cfg.optim.lr > 0, f"lr must be > 0 (got {cfg.optim.lr})")
    need(cfg.optim.weight_decay >= 0, f"weight_decay must be >= 0 (got {cfg.optim.weight_decay})")
    need(0 <= cfg.optim.beta1 < 1 and 0 <= cfg.optim.beta2 < 1, "beta1 and beta2 must lie in [0, 1)")
    need(cfg.optim.schedule in ("cosine", "constant"), f"schedule must be cosine or constant (got {cfg.optim.schedule!r})")
    need(cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda") or cfg.device == "mps",
         f"device must be auto, cpu, cuda, cuda:N or mps (got {cfg.device!r})")
    need(all(1 <= e <= cfg.epochs for e in cfg.save_epochs), f"save_epochs must lie in 1..epochs (got {cfg.save_epochs})")
    dg = cfg.diag
    need(dg.eval_n >= 1 and dg.rho_n >= 1 and dg.rho_dirs >= 1, "eval_n, rho_n and rho_dirs must be >= 1")
    need(dg.every >= 0 and dg.full_every >= 0, "every and full_every must be >= 0")
    need(dg.rho_eps > 0 and dg.nudge_eta > 0, "rho_eps and nudge_eta must be > 0")
    need(dg.stab_batches >= 2 and dg.stab_batch_size >= 1, "stab_batches must be >= 2 and stab_batch_size >= 1")
    need(cfg.model.L is None or cfg.model.L >= 0, f"L must be >= 0 (got {cfg.model.L})")
    need(cfg.model.d is None or cfg.model.d >= 1, f"d must be >= 1 (got {cfg.model.d})")
    for name in ("setting", "arch_label"):
        value = getattr(cfg, name)
        need((bool(value) or name == "arch_label") and "/" not in value and "__" not in value,
             f"{name} must be a name without '/' or '__' (got {value!r})")
    cfg.data.validate()
    check_effective(cfg)


def check_effective(cfg: TrainConfig) -> None:
    """Refuse a field this run would silently ignore (one line saying why): no field of a config
    is ever accepted without effect. ``tests/test_config_fields.py`` walks every field × rule."""
    from creditaudit.models.base import ARCH_SPECIFIC_FIELDS, arch_fields, arch_shape
    from creditaudit.rules import RULES, parse_rule_name

    base, variant = parse_rule_name(cfg.rule)
    if variant and cfg.lam:
        raise ConfigError(f"lam={cfg.lam:g} has no effect on {cfg.rule}: the penalty acts on the blocks' branch outputs, "
                          f"which a _{variant} baseline does not train; drop lam (the baseline of a penalised run is the unpenalised one)")
    if variant == "shallow" and cfg.model.L not in (None, 0):
        raise ConfigError(f"L={cfg.model.L} has no effect on {cfg.rule}: the _shallow variant has no blocks (L=0); drop L")
    no_blocks = variant == "shallow" or cfg.model.L == 0
    if no_blocks and cfg.lam:
        raise ConfigError(f"lam={cfg.lam:g} has no effect with L=0: there is no block to penalise; drop lam")
    if no_blocks and cfg.model.residual is not None and cfg.model.residual != arch_shape(cfg.arch, ModelConfig()).residual:
        raise ConfigError(f"residual={cfg.model.residual} has no effect on {cfg.rule} with no blocks (L=0): "
                          "there is no skip path to change; drop it")
    if RULES.get(base).end_to_end and cfg.local_rule.strip() != "inner":
        raise ConfigError(f"local_rule={cfg.local_rule} has no effect on {cfg.rule}: it trains end to end by autograd; "
                          "local_rule applies to rules with a local update (fa, dfa, ep, sb, cb, …)")
    default_model = ModelConfig()
    own = arch_fields(cfg.arch)
    for name in ARCH_SPECIFIC_FIELDS:
        if name not in own and getattr(cfg.model, name) != getattr(default_model, name):
            readers = ", ".join(_archs_reading(name)) or "no architecture"
            raise ConfigError(f"model.{name}={getattr(cfg.model, name)!r} has no effect on arch {cfg.arch!r} "
                              f"(read by {readers}); drop it")
    default_data = type(cfg.data)()
    if cfg.data.dataset != "student":
        for f in dataclasses.fields(cfg.data):
            if f.name.startswith("student_") and getattr(cfg.data, f.name) != getattr(default_data, f.name):
                raise ConfigError(f"data.{f.name} has no effect on dataset {cfg.data.dataset!r}: it sets the student task only")
    if not cfg.diag.enabled:
        default_diag = type(cfg.diag)()
        for f in dataclasses.fields(cfg.diag):
            if f.name != "enabled" and getattr(cfg.diag, f.name) != getattr(default_diag, f.name):
                raise ConfigError(f"diag.{f.name} has no effect with diag.enabled=false: drop it or enable the diagnostics")


def _archs_reading(name: str) -> list[str]:
    from creditaudit.models import ARCHS
    from creditaudit.models.base import arch_fields

    return [a for a in ARCHS.names() if name in arch_fields(a)]


def run_path(cfg: TrainConfig):
    """The run's folder: <results>/<setting>/<rule>__<arch_label or arch>__s<seed>."""
    from creditaudit.runs.folder import run_dir

    return run_dir(cfg.results, cfg.setting, cfg.rule, cfg.arch_label or cfg.arch, cfg.seed)


def to_dict(cfg: Any) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def from_dict(data: dict, cfg_type: type = TrainConfig) -> Any:
    """Rebuild a config from :func:`to_dict` output; unknown keys are an error, missing keys default."""
    hints = typing.get_type_hints(cfg_type)
    names = {f.name for f in dataclasses.fields(cfg_type)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown config keys for {cfg_type.__name__}: {', '.join(sorted(unknown))}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(value, tp)
        elif typing.get_origin(tp) is tuple:
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cfg_type(**kwargs)


def copy_config(cfg: Any) -> Any:
    return from_dict(to_dict(cfg), type(cfg))


def help_rows(cfg_type: type = TrainConfig) -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) for every field, for ``--help``."""
    default = cfg_type()
    rows = []
    for path, f, tp in iter_fields(cfg_type):
        leaf = path.rsplit(".", 1)[-1]
        key = leaf if len(leaf_index(cfg_type)[leaf]) == 1 else path
        tname = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
        rows.append((key, tname, json.dumps(get_path(default, path)), f.metadata.get("help", "")))
    return rows
