"""How to resume a run that did not finish: the shell command that picks it up where its last
checkpoint left it, and the Markdown note every report prints for it.

A run a sweep of its setting trains is resumed by rerunning that sweep (``creditaudit sweep SETTING
--profile P``: finished runs are skipped); any other run by ``creditaudit train`` with the
``key=value`` items that rebuild its config. Which one is decided from the run's ``config.json``
alone (:class:`~creditaudit.reports.collect.RunRecord`): nothing is trained, no rule file imported.
"""

from __future__ import annotations

import contextlib
import functools
import shlex
from typing import Any

from creditaudit.errors import UserError
from creditaudit.reports.collect import RunRecord

# What reading a run's config.json back into a config can raise: a UserError for a config of
# another version (unknown keys, an unknown rule or option: ConfigError, UnknownNameError), a
# TypeError or AttributeError for one edited into another shape (a section that is not an object,
# a list field holding a number).
_UNREADABLE = (UserError, TypeError, AttributeError)


def unfinished_note(run: RunRecord, left_out: str = "not in any table") -> str:
    """Markdown: why ``run`` (not finished) is left out, and for an interrupted run the command that
    resumes it, e.g. ``interrupted (its process 1234 on this machine no longer exists): resume with
    `creditaudit sweep main_audit --profile cpu results=res` (finished runs are skipped)``."""
    if run.status != "interrupted":
        return f"status {run.status}; {left_out}"
    why = f"interrupted ({run.gone})" if run.gone else "interrupted"
    how, command = resume_command(run)
    tail = " (finished runs are skipped)" if how == "sweep" else ""
    return f"{why}: resume with {_code(command)}{tail}"


def _code(text: str) -> str:
    """``text`` as a Markdown code span, fenced with more backticks than it holds in a row."""
    longest, current = 0, 0
    for ch in text:
        current = current + 1 if ch == "`" else 0
        longest = max(longest, current)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def resume_command(run: RunRecord) -> tuple[str, str]:
    """``(how, command)``: the shell command that resumes ``run`` where its last checkpoint left it.

    ``("sweep", "creditaudit sweep SETTING --profile P results=ROOT")`` when the run is one a sweep
    of its setting trains (its config is the setting's expansion under profile ``P``, up to fields
    that do not change results): rerunning that sweep resumes it and skips the finished runs.
    Otherwise ``("train", "creditaudit train rule=... arch=... seed=... setting=... results=...
    [every other field that differs from the defaults]")``, which rebuilds the run's config. ROOT is
    the results folder the run was read from (the folder above its setting)."""
    root = run.path.parent.parent
    results = [] if str(root) == "results" else [f"results={root}"]
    swept = _sweep_profile(run)
    if swept is not None:
        profile, expanded = swept
        return "sweep", shlex.join(
            [
                "creditaudit",
                "sweep",
                run.setting,
                "--profile",
                profile,
                *results,
                *_where_and_how(run.config, expanded),
            ]
        )
    return "train", shlex.join(["creditaudit", "train", *_train_overrides(run, results)])


_WHERE_AND_HOW = ("device", "threads", "eval_batch_size", "data.data_dir")
"""Fields that do not change results but that the run was started with: where its data is, which
device and threads it used. Kept in the command that resumes it."""


def _where_and_how(config: dict[str, Any], default: dict[str, Any]) -> list[str]:
    out = []
    for path in _WHERE_AND_HOW:
        value, other = _get(config, path), _get(default, path)
        if value is not None and value != other:
            out.append(f"{path}={_text(value)}")
    return out


def _get(config: dict[str, Any], path: str) -> Any:
    """The value at the dotted ``path`` of ``config``; None where a key is missing."""
    node: Any = config
    for key in path.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def _sweep_profile(run: RunRecord) -> tuple[str, dict[str, Any]] | None:
    """The profile under which a sweep of ``run.setting`` trains exactly ``run`` (up to the fields
    that do not change results), and that sweep's config of it; None if no sweep does."""
    from creditaudit.config import to_dict
    from creditaudit.experiments import SETTINGS, SWEEP, profile_names
    from creditaudit.typedconfig import semantic_dict

    if run.setting not in SETTINGS:
        return None
    stored = _stored(run)
    if stored is None:  # a config of another version: no sweep of this one made it
        return None
    for profile in profile_names(SWEEP):
        for cfg in _expansion(run.setting, profile):
            key = (cfg.rule, cfg.arch_label or cfg.arch, cfg.seed)
            if key == (run.rule, run.arch, run.seed) and semantic_dict(cfg) == stored:
                return profile, to_dict(cfg)
    return None


@functools.cache
def _expansion(setting: str, profile: str) -> tuple:
    """The resolved configs (as the trainer records them) a sweep of ``setting`` under ``profile``
    trains; () if the setting does not expand here (e.g. a rule file that is not loaded)."""
    from creditaudit.config import resolve_rule_options
    from creditaudit.experiments import expand

    try:
        return tuple(resolve_rule_options(c) for c in expand(setting, profile=profile))
    except UserError:  # an unknown rule or architecture, a config the setting cannot start with
        return ()


def _stored(run: RunRecord) -> dict | None:
    """The fields of ``run``'s config that change results, resolved as the trainer records them
    (every option of the rule, the architecture's norm and skip path); None if unreadable."""
    from creditaudit.config import from_dict, resolve_rule_options
    from creditaudit.typedconfig import semantic_dict

    try:
        cfg = from_dict(run.config)
    except _UNREADABLE:
        return None
    if not cfg.plugins:  # a rule file is not imported to write a report
        with contextlib.suppress(*_UNREADABLE):
            cfg = resolve_rule_options(cfg)
    return semantic_dict(cfg)


def _train_overrides(run: RunRecord, results: list[str]) -> list[str]:
    """``key=value`` items for ``creditaudit train`` that rebuild the config of ``run``."""
    from creditaudit.config import TrainConfig, apply_overrides, resolve_rule_options
    from creditaudit.typedconfig import semantic_dict, to_dict

    config = run.config
    label = config.get("arch_label") or ""
    base = [
        f"rule={config.get('rule', run.rule)}",
        f"arch={config.get('arch', run.arch)}",
        f"seed={config.get('seed', run.seed)}",
        f"setting={run.setting}",
        *results,
    ]
    if label:
        base.append(f"arch_label={label}")
    plugins = config.get("plugins") or []
    if plugins:
        base.append(f"plugins={','.join(plugins)}")
    where = _where_and_how(config, to_dict(TrainConfig()))
    stored = _stored(run)
    if stored is None:  # a config this version cannot read: the identifying fields at least
        return base + where
    default = None
    if not plugins:  # a rule file is not imported to write a report
        try:  # every item is text, parsed as the command line would be: only a UserError
            default = semantic_dict(resolve_rule_options(apply_overrides(TrainConfig(), base)))
        except UserError:  # e.g. a rule or architecture this version does not know
            default = None
    if default is None:
        default = semantic_dict(TrainConfig())
        default["rule_opts"] = {}
    rule_base = str(stored.get("rule", run.rule)).removesuffix("_frozen").removesuffix("_shallow")
    return base + where + _changed(stored, default, "", rule_base)


def _changed(stored: dict, default: dict, prefix: str, rule_base: str) -> list[str]:
    out = []
    for key, value in stored.items():
        path = f"{prefix}{key}"
        other = default.get(key)
        if path == "rule_opts" and isinstance(value, dict):
            other = other if isinstance(other, dict) else {}
            out += [
                f"{rule_base}.{k}={_text(v)}"
                for k, v in value.items()
                if k not in other or other[k] != v
            ]
        elif isinstance(value, dict):
            out += _changed(value, other if isinstance(other, dict) else {}, f"{path}.", rule_base)
        elif path not in ("rule", "arch", "seed", "plugins") and value != other:
            out.append(f"{path}={_text(value)}")
    return out


def _text(value: Any) -> str:
    """A config value as ``key=value`` text reads it back (``creditaudit.typedconfig.parse_value``)."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(_text(v) for v in value)
    if isinstance(value, float):
        return repr(value)
    return str(value)
