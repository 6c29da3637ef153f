"""The Python API: the verbs of the command line as functions, with the same defaults and the same
results on disk (``creditaudit.train``, ``creditaudit.audit``, ``creditaudit.sweep``,
``creditaudit.tables``, ``creditaudit.inventory``, ``creditaudit.load``). The CLI is a thin layer
over these: it parses, calls, prints.

    import creditaudit

    run = creditaudit.train(rule="dfa", dataset="digits", epochs=3)   # or train(cfg), train("rule=dfa", …)
    run.status, run.final["test/acc"], run.path

    result = creditaudit.audit(rules=["bp", "dfa"], dataset="digits", epochs=3, workers=2)
    result.table()            # one dict per rule: verdict, claim, figures (mean, std, n)
    result.to_frame()         # the same as a pandas DataFrame

Configuration comes as a :class:`~creditaudit.config.TrainConfig`, as ``"key=value"`` strings (the
command line's overrides) or as keyword arguments (``epochs=3``, ``diag__every=2`` for ``diag.every``
— or pass ``"diag.every=2"``); later ones win. Errors a user can act on raise
:class:`creditaudit.errors.UserError` (a bad value, a missing folder), never ``SystemExit``; a run
that fails or diverges is an outcome (``status``), not an exception, as on the command line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from creditaudit.errors import ConfigError, MissingPathError
from creditaudit.experiments import SEEDS3


def _items(overrides: Iterable[str] = (), fields: dict[str, Any] | None = None) -> tuple[str, ...]:
    """``"key=value"`` items from overrides and keyword fields (``a__b=1`` is ``a.b=1``; a tuple or
    list is comma-separated; booleans are ``true``/``false``)."""
    items = []
    for item in overrides:  # the form of each item is checked where it is applied (apply_overrides)
        if not isinstance(item, str):
            raise ConfigError(f'{item!r} is not a key=value override (e.g. "epochs=3")')
        items.append(item)
    for key, value in (fields or {}).items():
        if isinstance(value, bool):
            value = str(value).lower()
        elif isinstance(value, (tuple, list)):
            value = ",".join(map(str, value))
        items.append(f"{key.replace('__', '.')}={value}")
    return tuple(items)


def make_config(*overrides: str, base=None, **fields: Any):
    """A checked :class:`~creditaudit.config.TrainConfig` (frozen: ``config.checked``): ``base``
    (default: every field's default) with the overrides applied, as ``creditaudit train`` builds
    it. ``config.copy_config`` gives an editable copy."""
    from creditaudit.config import TrainConfig, checked

    return checked(base if base is not None else TrainConfig(), _items(overrides, fields))


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    """What a training run ended as (its folder holds everything else)."""

    run: str  # the folder's name, rule__arch__sSEED
    status: str  # finished | diverged | failed | interrupted | skipped (already finished) | locked
    path: Path
    epochs_done: int
    wall_s: float
    final: dict[str, float]  # the last epoch's logged figures (test/acc, diag/…)
    summary: dict[str, Any]  # summary.json as written

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    def metrics(self) -> list[dict[str, Any]]:
        """Every logged epoch of the run (metrics.jsonl), epoch 0 first."""
        from creditaudit.runs.folder import RunFolder

        return RunFolder(self.path).read_metrics()


def train(
    cfg=None,
    /,
    *overrides: str,
    on_epoch: Callable[[Any, dict], None] | None = None,
    reporter=None,
    **fields: Any,
) -> RunResult:
    """Train one run (or resume it, or skip it when finished), as ``creditaudit train``: its folder
    is ``<results>/<setting>/<rule>__<arch>__s<seed>/``. ``cfg`` is a TrainConfig or the first
    ``"key=value"`` item; ``on_epoch(run, record)`` hears of each epoch (``reporter``: a
    :class:`creditaudit.training.trainer.Reporter` for every event, as the CLI's progress bar)."""
    from creditaudit.config import TrainConfig, run_path
    from creditaudit.training.trainer import Reporter
    from creditaudit.training.trainer import train as train_run

    if isinstance(cfg, str):
        overrides, cfg = (cfg, *overrides), None
    elif cfg is not None and not isinstance(cfg, TrainConfig):
        raise ConfigError(
            f"train() takes a TrainConfig or key=value overrides, not {type(cfg).__name__}"
        )
    c = make_config(*overrides, base=cfg, **fields)
    summary = train_run(
        c, reporter=reporter or (Reporter(on_epoch=on_epoch) if on_epoch else Reporter())
    )
    return RunResult(
        summary.get("run", run_path(c).name),
        summary["status"],
        run_path(c),
        int(summary.get("epochs_done", 0)),
        float(summary.get("wall_s", 0.0)),
        dict(summary.get("final") or {}),
        summary,
    )


# ---------------------------------------------------------------------------------------------
# Many runs
# ---------------------------------------------------------------------------------------------
@dataclass
class SweepResult:
    """The runs a sweep (or an audit) trained: each config, and each run's outcome."""

    configs: list
    outcomes: list = field(default_factory=list)  # creditaudit.jobs.RunOutcome, in completion order
    reused: list = field(
        default_factory=list
    )  # the configs whose runs had finished before: not trained again

    @property
    def statuses(self) -> list[str]:
        """Every run's status, ``finished`` for the reused ones."""
        return ["finished"] * len(self.reused) + [o.status for o in self.outcomes]

    @property
    def failed(self) -> list:
        """The outcomes of runs that did not finish (failed, diverged, interrupted, held)."""
        return [o for o in self.outcomes if o.status != "finished"]


def train_many(
    configs: list,
    *,
    workers: int = 0,
    backend: str = "local",
    address: str | None = None,
    gpus_per_run: float = 0.0,
    stack: int = 1,
    graph: bool = False,
    on_start: Callable[[list, list], None] | None = None,
    on_done: Callable | None = None,
    say: Callable[[str], None] | None = None,
    died: Callable[[str], None] | None = None,
) -> SweepResult:
    """Train ``configs`` in parallel: ``workers`` single-thread processes on this machine
    (``backend="local"``; 0 = one per core) or one Ray task per job (``backend="ray"``; ``address``
    the cluster, default $RAY_ADDRESS or a local instance). Finished runs are reused, killed ones
    resume; a run's failure is its outcome, never an exception. ``on_start(todo, reused)`` hears
    which configs will train and which finished before, ahead of any training; ``on_done(outcome, i,
    n)`` of each run trained; ``say`` gets the workers' stderr lines; ``died`` each lost worker."""
    from creditaudit.config import checked

    if backend not in ("local", "ray"):
        raise ConfigError(f"backend {backend!r}: choose local or ray")
    configs = [checked(c) for c in configs]  # as they are, when built by make_config or plan
    todo, reused = split_finished(configs)
    if on_start:
        on_start(todo, reused)
    outcomes: list = []
    if todo and backend == "local":
        from creditaudit.jobs import run_many

        outcomes = run_many(
            todo, workers=workers, stack=stack, graph=graph, on_done=on_done, say=say, died=died
        )
    elif todo:
        from creditaudit.jobs.ray_backend import run_many_ray

        outcomes = run_many_ray(
            todo,
            address=address or None,
            num_cpus=workers or None,
            gpus_per_run=gpus_per_run,
            stack=stack,
            graph=graph,
            on_done=on_done,
        )
    return SweepResult(list(configs), list(outcomes), reused)


def split_finished(configs: Iterable) -> tuple[list, list]:
    """(the configs whose runs are still to train, those whose runs have finished)."""
    from creditaudit.config import run_path
    from creditaudit.runs.folder import RunFolder

    todo: list = []
    done: list = []
    for c in configs:
        (done if RunFolder(run_path(c)).status() == "finished" else todo).append(c)
    return todo, done


def plan(
    *settings: str,
    profile: str = "cpu",
    with_baselines: bool = False,
    overrides: Iterable[str] = (),
    **fields: Any,
) -> list:
    """The run configs ``creditaudit sweep SETTING... --profile P`` trains (``"all"``: every setting
    of the study), baselines first; nothing is trained."""
    from creditaudit.experiments import baselines, expand, study_settings

    if not settings:
        raise ConfigError('name at least one setting (see `creditaudit list`), or "all"')
    names = study_settings() if list(settings) == ["all"] else list(settings)
    items = _items(overrides, fields)
    cfgs = [c for n in names for c in expand(n, profile=profile, overrides=items)]
    added = baselines(cfgs, profile=profile, overrides=items) if with_baselines else []
    return added + cfgs


def sweep(
    *settings: str,
    profile: str = "cpu",
    with_baselines: bool = False,
    overrides: Iterable[str] = (),
    workers: int = 0,
    backend: str = "local",
    address: str | None = None,
    gpus_per_run: float = 0.0,
    stack: int = 1,
    graph: bool = False,
    on_done: Callable | None = None,
    **fields: Any,
) -> SweepResult:
    """Train settings of the study, as ``creditaudit sweep``: :func:`plan`, then :func:`train_many`."""
    cfgs = plan(
        *settings, profile=profile, with_baselines=with_baselines, overrides=overrides, **fields
    )
    return train_many(
        cfgs,
        workers=workers,
        backend=backend,
        address=address,
        gpus_per_run=gpus_per_run,
        stack=stack,
        graph=graph,
        on_done=on_done,
    )


# ---------------------------------------------------------------------------------------------
# The audit
# ---------------------------------------------------------------------------------------------
@dataclass
class AuditResult:
    """One audit per setting audited (``creditaudit.reports.audit.Audit``), the reports written,
    and the runs trained for it (empty when an existing folder was audited)."""

    audits: list
    reports: list[dict[str, Path]]
    trained: SweepResult | None = None
    problems: list[str] = field(default_factory=list)  # run folders that could not be read, and why

    def table(self) -> list[dict[str, Any]]:
        """One row per setting and rule: the verdict, the claim, how often each detector fired,
        and every figure as ``<figure>`` (mean), ``<figure>_std`` (ddof=1) and ``<figure>_n``."""
        rows = []
        for audit in self.audits:
            for ra in audit.rules:
                row: dict[str, Any] = {
                    "setting": audit.setting,
                    "rule": ra.rule,
                    "n": ra.verdict.n,
                    "verdict": ra.verdict.label,
                    "claim": ra.verdict.claim,
                }
                for d in ("D1", "D2", "D3"):
                    row[f"{d}_fired"] = sum(e is not None for e in ra.fire_epochs(d))
                for m, count in ra.verdict.modes.items():
                    row[m] = count
                for key, (mean, std, n) in ra.stats.items():
                    row[key], row[f"{key}_std"], row[f"{key}_n"] = mean, std, n
                rows.append(row)
        return rows

    def to_frame(self):
        """:meth:`table` as a pandas DataFrame (``pip install 'creditaudit[data]'``)."""
        from creditaudit.results import _pandas

        return _pandas().DataFrame(self.table())


def audit(
    results: str | Path | None = None,
    /,
    *overrides: str,
    rules: Iterable[str] | None = None,
    profile: str = "default",
    seeds: Iterable[int] = SEEDS3,
    workers: int = 0,
    own_baseline: bool = False,
    thresholds=None,
    out: str | Path | None = None,
    on_done: Callable | None = None,
    **fields: Any,
) -> AuditResult:
    """Train and audit, as ``creditaudit audit``: without ``results``, the profile's rules (or
    ``rules``: names, rule files, or ``["all"]``) × ``seeds`` and the ``bp_frozen`` baseline (each
    rule's own ``<rule>_frozen`` with ``own_baseline``) are trained — finished runs reused — and
    audited; with ``results``, the finished runs there are re-audited, training nothing. The
    reports (Markdown, HTML, plots) go to ``out`` (default ``<results>/_reports/<setting>/``).
    ``thresholds``: a :class:`~creditaudit.diagnostics.verdict.Thresholds`. When no run trained
    here finished, there is nothing to audit: the result holds no audit, and ``trained.failed`` why."""
    if results is not None:
        if overrides or fields or rules is not None:
            raise ConfigError(
                "audit(results) re-audits a folder: it takes no rules and no overrides"
            )
        return report(results, thresholds=thresholds, own_baseline=own_baseline, out=out)
    seeds = tuple(seeds)
    if not seeds:
        raise ConfigError("name at least one seed, e.g. seeds=(42, 123, 456)")
    cfgs = audit_configs(
        rules,
        profile=profile,
        seeds=seeds,
        own_baseline=own_baseline,
        overrides=overrides,
        **fields,
    )
    trained = train_many(cfgs, workers=workers, on_done=on_done)
    if not any(s == "finished" for s in trained.statuses):
        return AuditResult([], [], trained)  # nothing to audit: trained.failed says why
    result = report(
        cfgs[0].results,
        setting=cfgs[0].setting,
        thresholds=thresholds,
        own_baseline=own_baseline,
        out=out,
    )
    result.trained = trained
    return result


def audit_configs(
    rules: Iterable[str] | None = None,
    *,
    profile: str = "default",
    seeds: Iterable[int] = SEEDS3,
    own_baseline: bool = False,
    overrides: Iterable[str] = (),
    **fields: Any,
) -> list:
    """The runs :func:`audit` trains: ``rules`` (names, rule files, or ``["all"]``; default the
    profile's) × ``seeds`` and the baseline × ``seeds``, under ``profile``."""
    from creditaudit import experiments

    names = (
        list(rules)
        if rules is not None
        else list(experiments.get_profile(profile, experiments.AUDIT).audit_rules)
    )
    if names == ["all"]:
        from creditaudit.rules import RULES

        names = RULES.names()
    names, items = resolve_rule_files(list(dict.fromkeys(names)), _items(overrides, fields))
    if own_baseline:
        names += [f"{r}_frozen" for r in names if not r.endswith("_frozen")]
    return experiments.audit_configs(
        names,
        profile=profile,
        seeds=tuple(seeds),
        overrides=items,
        baseline=None if own_baseline else experiments.BASELINE_RULE,
    )


class NothingToAudit(MissingPathError):
    """No finished run to audit: no readable run folder, or not one finished run among them.
    ``problems``: the folders that could not be read, and why."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = list(problems or [])


def report(
    results: str | Path,
    *,
    setting: str | None = None,
    thresholds=None,
    own_baseline: bool = False,
    out: str | Path | None = None,
) -> AuditResult:
    """Audit the finished runs under ``results`` (of one ``setting``, or of every one) and write
    their reports, training nothing: :func:`audit` of a folder."""
    from collections import Counter

    from creditaudit.reports.audit import write_reports
    from creditaudit.reports.collect import collect

    root = require_results(results)
    col = collect(root, [setting] if setting else None)
    if not col.runs:
        raise NothingToAudit(
            f"no readable run folders under {root}"
            + (f" ({len(col.problems)} skipped)" if col.problems else ""),
            col.problems,
        )
    written = write_reports(
        col, root, setting=setting, thresholds=thresholds, own_baseline=own_baseline, out=out
    )
    if not written:
        counts = Counter(r.status for r in col.runs)
        raise NothingToAudit(
            f"nothing to audit under {root}: no run has finished "
            f"({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))}); "
            "finish them with `creditaudit sweep SETTING` (killed runs resume) and audit again",
            col.problems,
        )
    return AuditResult([a for a, _ in written], [p for _, p in written], None, col.problems)


def resolve_rule_files(
    rules: list[str], overrides: tuple[str, ...]
) -> tuple[list[str], tuple[str, ...]]:
    """``my_rule.py`` -> the rule's registered name, with the file added to ``plugins``."""
    from creditaudit.rules import load_rule_file

    names, files = [], []
    for r in rules:
        if r.endswith(".py"):
            registered = load_rule_file(r)
            if len(registered) != 1:
                raise ConfigError(
                    f"{r} registers several rules ({', '.join(registered)}): name one and pass plugins={r}"
                )
            names.append(registered[0])
            files.append(str(Path(r).resolve()))
        else:
            names.append(r)
    if files:
        overrides = (*overrides, f"plugins={','.join(files)}")
    return names, overrides


# ---------------------------------------------------------------------------------------------
# Reports from a results folder (training nothing)
# ---------------------------------------------------------------------------------------------
def require_results(results: str | Path) -> Path:
    """The results folder ``results`` names; a missing one is one line naming the fix."""
    if not Path(results).is_dir():
        what = " (that is a file)" if Path(results).exists() else ""
        raise MissingPathError(
            f"no results folder {str(results)!r}{what}; train some runs first "
            "(`creditaudit audit` or `creditaudit sweep SETTING`) or name the folder that holds them"
        )
    return Path(results)


@dataclass
class TablesResult:
    """The study's tables (``creditaudit.reports.tables.Table``: title, header, rows, notes) and
    the Markdown file written."""

    tables: list
    path: Path
    collection: Any = None  # the results folder as read (creditaudit.reports.collect.Collection)
    skipped: list[str] = field(default_factory=list)  # run folders left out of every table, and why

    def __getitem__(self, key: str):
        for t in self.tables:
            if t.key == key:
                return t
        raise KeyError(
            f"no table {key!r}; these were built: {', '.join(t.key for t in self.tables)}"
        )


def tables(
    results: str | Path = "results",
    *,
    names: Iterable[str] = (),
    out: str | Path | None = None,
    triangulate: str | None = None,
    thresholds=None,
) -> TablesResult:
    """The study's tables from a results folder alone, as ``creditaudit tables``: Table 1, FA vs
    DFA, penalty sweep, depth sweep, cross-architecture, functional triangulation (``names``: some
    of them), written to ``out`` (default ``<results>/_reports/tables.md``)."""
    from creditaudit.diagnostics.verdict import Thresholds
    from creditaudit.reports import tables as report_tables
    from creditaudit.reports.collect import collect
    from creditaudit.runs.io import atomic_write_text

    names = list(names)
    unknown = [n for n in names if n not in report_tables.TABLES]
    if unknown:
        raise ConfigError(
            f"unknown table {unknown[0]!r}; choose from {', '.join(report_tables.TABLES)}"
        )
    col = collect(require_results(results))
    th = thresholds or Thresholds()
    chosen = [
        report_tables.triangulation(col, th, triangulate or None)
        if n == "triangulation"
        else report_tables.TABLES[n](col, th)
        for n in (names or report_tables.TABLES)
    ]
    path = Path(out) if out else Path(results) / "_reports" / "tables.md"
    atomic_write_text(
        path, report_tables.tables_markdown(col, th, source=str(results), only=chosen)
    )
    return TablesResult(chosen, path, col, report_tables.skipped(col))


@dataclass
class InventoryResult:
    """Where TRAINING_INVENTORY.md was written, and what the folder held."""

    path: Path
    runs: int
    finished: int
    problems: list[str] = field(default_factory=list)  # run folders that could not be read, and why


def inventory(results: str | Path = "results", *, out: str | Path | None = None) -> InventoryResult:
    """Write TRAINING_INVENTORY.md from a results folder alone, as ``creditaudit inventory``
    (default ``<results>/_reports/TRAINING_INVENTORY.md``)."""
    from creditaudit.reports.collect import collect
    from creditaudit.reports.inventory import inventory_markdown
    from creditaudit.runs.io import atomic_write_text

    col = collect(require_results(results))
    path = Path(out) if out else Path(results) / "_reports" / "TRAINING_INVENTORY.md"
    atomic_write_text(path, inventory_markdown(col, str(results)))
    return InventoryResult(
        path, len(col.runs), sum(r.status == "finished" for r in col.runs), list(col.problems)
    )


def load(results: str | Path = "results", settings: Iterable[str] | None = None):
    """Every run × logged epoch of a results folder as one pandas DataFrame (``creditaudit.results.load``)."""
    from creditaudit.results import load as load_results

    require_results(results)
    return load_results(results, list(settings) if settings is not None else None)


__all__ = [
    "AuditResult",
    "InventoryResult",
    "NothingToAudit",
    "RunResult",
    "SweepResult",
    "TablesResult",
    "audit",
    "audit_configs",
    "inventory",
    "load",
    "make_config",
    "plan",
    "report",
    "sweep",
    "tables",
    "train",
    "train_many",
]
