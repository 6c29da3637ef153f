"""Read a results folder: every run folder ``<results>/<setting>/<rule>__<arch>__s<seed>/`` with its
config, summary and metrics. A corrupt or partial folder is reported and skipped, never fatal.
Folders whose name starts with ``_`` or ``.`` (``_reports``, the generated reports) are not runs.

A *finished* run must have complete metrics: its ``metrics.jsonl`` present, without a torn last
line, and ending at the run's last epoch (``summary.json``'s ``epochs_done``, else the config's
``epochs``); otherwise it is skipped with the reason, so no verdict is drawn from figures that do
not exist. A run still in progress (or interrupted) may end in a torn line: it is skipped over, as
the trainer's own reads do.

A run whose ``summary.json`` says ``running`` is running only while a process owns its folder: when
its ``run.lock`` is absent or stale (its process is gone: killed, out of memory; or a lost node,
whose lease ran out; :func:`creditaudit.runs.lock.lock_state`), the run is reported ``interrupted``
— resumable, with the command that resumes it (:func:`resume_command`). A lock held by a live
process, or by one on another machine whose lease has not run out, keeps it ``running``. Reading
never writes: the files on disk are left as they are (the next training of the run rewrites its
summary)."""

from __future__ import annotations

import contextlib
import functools
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from creditaudit.runs.folder import RunFolder, parse_run_name
from creditaudit.runs.io import CorruptRunError, read_jsonl_checked
from creditaudit.runs.lock import lock_state


@dataclass
class RunRecord:
    setting: str
    rule: str
    arch: str
    seed: int
    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]
    gone: str = (
        ""  # why no process owns a run whose summary says "running" (then it is "interrupted")
    )

    @property
    def status(self) -> str:
        """The summary's status, except that a ``running`` run whose process is gone is
        ``interrupted`` (see the module docstring)."""
        status = self.summary.get("status", "unknown")
        return "interrupted" if status == "running" and self.gone else status

    @property
    def dataset(self) -> str:
        return self.config.get("data", {}).get("dataset", "?")


@dataclass
class Collection:
    runs: list[RunRecord] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # "path: why it was skipped"

    def select(self, **match: Any) -> list[RunRecord]:
        return [r for r in self.runs if all(getattr(r, k) == v for k, v in match.items())]


def collect(results: str | Path, settings: list[str] | None = None) -> Collection:
    """Every readable run under ``results`` (optionally only the given settings)."""
    root = Path(results)
    out = Collection()
    if not root.is_dir():
        out.problems.append(f"{root}: no such results folder")
        return out

    def visible(p: Path) -> bool:
        return p.is_dir() and not p.name.startswith(("_", "."))

    for setting_dir in sorted(p for p in root.iterdir() if visible(p)):
        if settings and setting_dir.name not in settings:
            continue
        for run_dir in sorted(p for p in setting_dir.iterdir() if visible(p)):
            try:
                rule, arch, seed = parse_run_name(run_dir.name)
            except ValueError:
                out.problems.append(
                    f"{run_dir}: not a run folder name (<rule>__<arch>__s<seed>); skipped"
                )
                continue
            folder = RunFolder(run_dir)
            try:
                config, summary = folder.read_config(), folder.read_summary()
                if config is None or summary is None:
                    missing = "config.json" if config is None else "summary.json"
                    out.problems.append(
                        f"{run_dir}: no {missing} (a run that never started); skipped"
                    )
                    continue
                disagree = _disagreement(config, setting_dir.name, rule, arch, seed)
                if disagree:
                    out.problems.append(
                        f"{run_dir}: config.json {disagree}: the folder was renamed or its config "
                        "edited, so its figures cannot be trusted to be this run's; skipped (move it "
                        "back, or train the run again)"
                    )
                    continue
                if summary.get("status") == "finished":
                    metrics = read_finished_metrics(folder, config, summary)
                else:
                    metrics = folder.read_metrics()
                gone = owner_gone(folder) if summary.get("status") == "running" else ""
            except (CorruptRunError, OSError, ValueError) as exc:
                out.problems.append(f"{run_dir}: {exc}; skipped")
                continue
            out.runs.append(
                RunRecord(
                    setting_dir.name, rule, arch, seed, run_dir, config, summary, metrics, gone
                )
            )
    return out


def _disagreement(config: dict, setting: str, rule: str, arch: str, seed: int) -> str:
    """How a run's config.json disagrees with the folder it is in (its setting, rule, architecture
    label and seed name the folder), or "" when it does not."""
    named = {"setting": setting, "rule": rule, "arch": arch, "seed": seed}
    recorded = {
        "setting": config.get("setting"),
        "rule": config.get("rule"),
        "arch": config.get("arch_label") or config.get("arch"),
        "seed": config.get("seed"),
    }
    wrong = [
        f"{k} {recorded[k]!r}" for k in named if recorded[k] is not None and recorded[k] != named[k]
    ]
    if not wrong:
        return ""
    differ = [f"{k} {named[k]!r}" for k in named if recorded[k] != named[k]]
    return f"says {', '.join(wrong)} but the folder is named for {', '.join(differ)}"


def owner_gone(folder: RunFolder) -> str:
    """Why no process owns ``folder`` any more — its ``run.lock`` is absent or stale — or "" while
    one may (a live process here, or a process on another machine, container or boot whose lease
    has not run out).

    The lock is looked at on both sides of a second read of the summary, so a run that ends (its
    final summary written, then its lock released) or starts (its lock taken, then ``running``
    written) between the reads is not taken for a dead one."""
    if lock_state(folder.lock_path).owned:
        return ""
    again = folder.read_summary()
    if again is None or again.get("status") != "running":
        return ""
    state = lock_state(folder.lock_path)
    if state.owned:
        return ""
    return state.detail if state.exists else "its process is gone and left no run.lock"


# ---------------------------------------------------------------------------------------------
# How to resume an unfinished run
# ---------------------------------------------------------------------------------------------


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


def _get(d: dict[str, Any], path: str) -> Any:
    for key in path.split("."):
        d = d.get(key) if isinstance(d, dict) else None
    return d


def _sweep_profile(run: RunRecord) -> tuple[str, dict[str, Any]] | None:
    """The profile under which a sweep of ``run.setting`` trains exactly ``run`` (up to the fields
    that do not change results), and that sweep's config of it; None if no sweep does."""
    from creditaudit import config as C
    from creditaudit import typedconfig as T
    from creditaudit.experiments import SETTINGS, SWEEP, profile_names

    if run.setting not in SETTINGS:
        return None
    stored = _stored(run)
    if stored is None:  # a config of another version: no sweep of this one made it
        return None
    for profile in profile_names(SWEEP):
        for cfg in _expansion(run.setting, profile):
            key = (cfg.rule, cfg.arch_label or cfg.arch, cfg.seed)
            if key == (run.rule, run.arch, run.seed) and T.semantic_dict(cfg) == stored:
                return profile, C.to_dict(cfg)
    return None


@functools.cache
def _expansion(setting: str, profile: str) -> tuple:
    """The resolved configs (as the trainer records them) a sweep of ``setting`` under ``profile``
    trains; () if the setting does not expand here (e.g. a rule file that is not loaded)."""
    from creditaudit import config as C
    from creditaudit.experiments import expand

    try:
        return tuple(C.resolve_rule_options(c) for c in expand(setting, profile=profile))
    except Exception:
        return ()


def _stored(run: RunRecord) -> dict | None:
    """The fields of ``run``'s config that change results, resolved as the trainer records them
    (every option of the rule, the architecture's norm and skip path); None if unreadable."""
    from creditaudit import config as C
    from creditaudit import typedconfig as T

    try:
        cfg = C.from_dict(run.config)
    except Exception:
        return None
    if not cfg.plugins:  # a rule file is not imported to write a report
        with contextlib.suppress(Exception):
            cfg = C.resolve_rule_options(cfg)
    return T.semantic_dict(cfg)


def _train_overrides(run: RunRecord, results: list[str]) -> list[str]:
    """``key=value`` items for ``creditaudit train`` that rebuild the config of ``run``."""
    from creditaudit import config as C
    from creditaudit import typedconfig as T

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
    where = _where_and_how(config, T.to_dict(C.TrainConfig()))
    stored = _stored(run)
    if stored is None:  # a config this version cannot read: the identifying fields at least
        return base + where
    default = None
    if not plugins:  # a rule file is not imported to write a report
        try:
            default = T.semantic_dict(
                C.resolve_rule_options(C.apply_overrides(C.TrainConfig(), base))
            )
        except Exception:
            default = None
    if default is None:
        default = T.semantic_dict(C.TrainConfig())
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


_RERUN = "delete the run folder to rerun the run from scratch"


def read_finished_metrics(
    folder: RunFolder, config: dict[str, Any], summary: dict[str, Any]
) -> list[dict[str, Any]]:
    """The metrics of a finished run, which must be complete: :class:`CorruptRunError` naming
    ``metrics.jsonl`` and what is wrong when the file is missing, empty, ends in a torn line, or
    does not end at the run's last epoch (``summary["epochs_done"]``, else ``config["epochs"]``)."""
    path = folder.metrics_path
    if not path.exists():
        raise CorruptRunError(
            path, "missing, though summary.json says the run finished", fix=_RERUN
        )
    records, n_bad = read_jsonl_checked(path)  # CorruptRunError for a bad line before the last
    if n_bad:
        raise CorruptRunError(
            path,
            "the last line is torn (not a complete JSON object), though summary.json "
            "says the run finished",
            fix=_RERUN,
        )
    if not records:
        raise CorruptRunError(
            path, "empty (no epoch logged), though summary.json says the run finished", fix=_RERUN
        )
    last = _last_epoch(config, summary)
    if last is not None:
        epochs = [r.get("epoch") for r in records]
        if last not in epochs:
            logged = [e for e in epochs if isinstance(e, int) and not isinstance(e, bool)]
            upto = f"it ends at epoch {max(logged)}" if logged else "no line has an epoch"
            raise CorruptRunError(
                path,
                f"no line for epoch {last}, the last epoch of the finished run "
                f"(summary.json epochs_done / config epochs); {upto}",
                fix=_RERUN,
            )
        if epochs[-1] != last:
            raise CorruptRunError(
                path,
                f"lines after epoch {last}, the last epoch of the finished run "
                f"(summary.json epochs_done / config epochs)",
                fix=_RERUN,
            )
    return records


def _last_epoch(config: dict[str, Any], summary: dict[str, Any]) -> int | None:
    for value in (summary.get("epochs_done"), config.get("epochs")):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def same_experiment(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """True when two run configs differ only in how credit is assigned (rule, its options, the local
    rule, the penalty) and in fields that do not change results: a run and its baseline."""
    ignore = {
        "rule",
        "rule_opts",
        "local_rule",
        "lam",
        "plugins",
        "progress",
        "results",
        "threads",
        "device",
        "eval_batch_size",
        "setting",
        "arch_label",
        "diag",
    }
    strip = lambda d: {k: v for k, v in d.items() if k not in ignore}  # noqa: E731
    da, db = dict(strip(a)), dict(strip(b))
    for d in (da, db):
        d["data"] = {k: v for k, v in d.get("data", {}).items() if k != "data_dir"}
    return da == db
