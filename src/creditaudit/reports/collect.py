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
— resumable, with the command that resumes it (``creditaudit.reports.resume``). A lock held by a
live process, or by one on another machine whose lease has not run out, keeps it ``running``.
Reading never writes: the files on disk are left as they are (the next training of the run
rewrites its summary)."""

from __future__ import annotations

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
