"""Read a results folder: every run folder ``<results>/<setting>/<rule>__<arch>__s<seed>/`` with its
config, summary and metrics. A corrupt or partial folder is reported and skipped, never fatal.
Folders whose name starts with ``_`` or ``.`` (``_reports``, the generated reports) are not runs."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from creditaudit.runs.folder import RunFolder, parse_run_name
from creditaudit.runs.io import CorruptRunError


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

    @property
    def status(self) -> str:
        return self.summary.get("status", "unknown")

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
                out.problems.append(f"{run_dir}: not a run folder name (<rule>__<arch>__s<seed>); skipped")
                continue
            folder = RunFolder(run_dir)
            try:
                config, summary = folder.read_config(), folder.read_summary()
                if config is None or summary is None:
                    missing = "config.json" if config is None else "summary.json"
                    out.problems.append(f"{run_dir}: no {missing} (a run that never started); skipped")
                    continue
                metrics = folder.read_metrics()
            except (CorruptRunError, OSError, ValueError) as exc:
                out.problems.append(f"{run_dir}: {exc}; skipped")
                continue
            out.runs.append(RunRecord(setting_dir.name, rule, arch, seed, run_dir, config, summary, metrics))
    return out


def same_experiment(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """True when two run configs differ only in how credit is assigned (rule, its options, the local
    rule, the penalty) and in fields that do not change results: a run and its baseline."""
    ignore = {"rule", "rule_opts", "local_rule", "lam", "plugins", "progress", "results", "threads", "device",
              "eval_batch_size", "setting", "arch_label", "diag"}
    strip = lambda d: {k: v for k, v in d.items() if k not in ignore}  # noqa: E731
    da, db = dict(strip(a)), dict(strip(b))
    for d in (da, db):
        d["data"] = {k: v for k, v in d.get("data", {}).items() if k != "data_dir"}
    return da == db
