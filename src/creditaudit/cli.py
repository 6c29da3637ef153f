"""The ``creditaudit`` command line: ``train``, ``list``, ``data``, ``audit``, ``sweep``, ``tables``,
``inventory``, ``export`` and ``exploit``. Each command parses its arguments, calls the package and
prints.

Errors a user can act on are one line on stderr naming the fix, exit status 2, never a traceback.
The command group wraps every command, from its first argument to its last report, in
:func:`friendly_errors`, which prints (``errors.user_message``) every
:class:`~creditaudit.errors.UserError` — a bad value or name, a missing dataset or folder, a run
folder held by another process, holding another config or corrupt, a model too large for the
device — and the operating system's errors about a path: permission denied, no space left, a
read-only file system, a file where a folder belongs or the reverse, a name too long, a file that
is not UTF-8. click's own usage errors (a bad option value) are one line too. Anything else is a
bug and keeps its traceback. Run folders and reports are written atomically, so such an error
loses nothing already computed.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from creditaudit.errors import MissingPathError, UserError, user_message

if TYPE_CHECKING:
    from creditaudit.registry import Registry


def _pipe_width() -> int | None:
    """Off a terminal (logs, CI, a pipe) tables get $COLUMNS columns when it is set, else 160 instead
    of rich's default 80; in a terminal rich measures it (None)."""
    if sys.stdout.isatty():
        return None
    columns = os.environ.get("COLUMNS", "").strip()
    return int(columns) if columns.isdigit() and int(columns) > 0 else 160


# Off a terminal a line is a line: never wrapped, so a path or an error stays whole for grep,
# whatever its length.
console = Console(highlight=False, width=_pipe_width(), soft_wrap=not sys.stdout.isatty())
err_console = Console(stderr=True, highlight=False, soft_wrap=not sys.stderr.isatty())


# The exit status of every command (README, "Exit status"; `creditaudit --help`).
OK = 0  # everything asked for was done: every run finished (now or before)
RUNS_FAILED = 1  # some run failed, diverged, was interrupted or lost its worker; the rest were done, reports written
USAGE = 2  # an error the user can fix (argument, config, folder, disk): one line on stderr, nothing computed lost
RUNS_HELD = 3  # nothing failed, but some runs are being trained by another process (their folders are locked)
INTERRUPTED = 130  # Ctrl-C (128 + SIGINT): what was computed is kept; the same command resumes

EXIT_STATUS_HELP = f"""Exit status: {OK} everything was done (every run finished); {RUNS_FAILED} some
run failed, diverged, was interrupted or lost its worker (the others were trained and the reports
written); {USAGE} an error you can fix, named in one line (nothing computed is lost); {RUNS_HELD} nothing
failed, but some runs are held by another process training them (run the command again once it is
done); {INTERRUPTED} interrupted (Ctrl-C): the same command resumes."""


def runs_status(statuses: list[str]) -> int:
    """The exit status of a command that trained runs with these outcomes."""
    from creditaudit.jobs.progress import FAILED, HELD

    if any(s in FAILED or s not in ("finished", HELD) for s in statuses):
        return RUNS_FAILED
    return RUNS_HELD if HELD in statuses else OK


class Commands(click.Group):
    """The command group: every command runs inside :func:`friendly_errors`; a usage error (a bad
    option value) is one line, not click's usage block; Ctrl-C anywhere is one line and status
    130, not click's "Aborted!" (1)."""

    def make_context(self, info_name, args, parent=None, **extra) -> click.Context:
        """The group's own options and command name (``creditaudit --nosuch``) are refused in the
        same one ``error:`` line as a command's, not click's ``Error:`` block."""
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:
            where = (
                f" (`{exc.ctx.command_path} --help` shows the usage)" if exc.ctx is not None else ""
            )
            _error_line(f"{exc.format_message()}{where}")

    def invoke(self, ctx: click.Context):
        try:
            with friendly_errors(), _terminate_as_interrupt():
                return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise  # a group named alone: its help
        except click.UsageError as exc:
            where = (
                f" (`{exc.ctx.command_path} --help` shows the usage)" if exc.ctx is not None else ""
            )
            _error_line(f"{exc.format_message()}{where}")
        except KeyboardInterrupt:
            err_console.print(
                "interrupted: what was computed is kept; run the same command again to resume"
            )
            sys.exit(INTERRUPTED)


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (``kill PID``, a scheduler's stop) ends a command the way Ctrl-C does: its runs
    record themselves interrupted, its workers stop, and the same command resumes."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals to whoever owns them
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def show(renderable) -> None:
    """Print a table; off a terminal without the spaces rich pads its lines' ends with."""
    if console.is_terminal:
        console.print(renderable)
        return
    with console.capture() as captured:
        console.print(renderable)
    console.out("\n".join(line.rstrip() for line in captured.get().splitlines()), highlight=False)


def _error_line(text: str) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {escape(text)}", markup=True, soft_wrap=True)
    sys.exit(USAGE)


@contextmanager
def friendly_errors():
    """An error the user can act on (``errors.user_message``: a :class:`~creditaudit.errors.UserError`,
    the operating system's errors about a path, a file that is not UTF-8) becomes one line on stderr
    and exit status 2; anything else goes on, with its traceback."""
    try:
        yield
    except (UserError, OSError, UnicodeDecodeError) as exc:
        line = user_message(exc)
        if line is None:
            raise
        _error_line(line)


class SeedList(click.ParamType):
    """Comma-separated run seeds, e.g. ``42,123,456``: integers in 0..SEED_MAX ("" gives ())."""

    name = "seeds"

    def convert(self, value, param, ctx) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        from creditaudit.config import SEED_MAX

        try:
            seeds = tuple(int(s) for s in str(value).split(",") if s.strip())
        except ValueError:
            self.fail(f"{value!r}: expected comma-separated integers, e.g. 42,123,456", param, ctx)
        for s in seeds:
            if not 0 <= s <= SEED_MAX:
                self.fail(f"seed {s} is outside 0..{SEED_MAX}", param, ctx)
        return seeds


class Threshold(click.ParamType):
    """A verdict threshold: a finite number (an infinite or NaN one would make a check that can
    never fire, or always does)."""

    name = "float"

    def convert(self, value, param, ctx) -> float:
        import math

        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r}: expected a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r}: expected a finite number", param, ctx)
        return number


class ThresholdOption(click.Option):
    """A verdict threshold's option (``--d1 --d2 --d3 --mode2``) whose default, shown in the help,
    is the field ``threshold`` of :class:`~creditaudit.diagnostics.verdict.Thresholds`, the one
    definition. It is looked up when the help or a command line needs it, not when the CLI loads
    (the diagnostics import torch)."""

    def __init__(self, *args: Any, threshold: str, **kwargs: Any):
        kwargs.update(type=Threshold(), show_default=True)
        super().__init__(*args, **kwargs)
        self.threshold = threshold

    def get_default(self, ctx: click.Context, call: bool = True) -> float:
        from creditaudit.diagnostics.verdict import Thresholds

        return getattr(Thresholds(), self.threshold)


def config_rows() -> list[tuple[str, str]]:
    """(key, help) for every config field: its dotted path (``diag.every``, ``data.dataset``), so no
    key reads as if it stood alone; the help ends with its type and default."""
    from creditaudit.config import TrainConfig, help_rows
    from creditaudit.typedconfig import iter_fields

    paths = [path for path, *_ in iter_fields(TrainConfig)]
    return [
        (path, f"{text} [{tname}, default {default}]")
        for path, (_, tname, default, text) in zip(paths, help_rows(), strict=True)
    ]


class FieldHelpCommand(click.Command):
    """A command whose --help ends with every config field and its doc, wrapped to the terminal as
    click wraps the options."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Overrides (key=value)"):
            formatter.write_text(
                "A key is a field's dotted path below; a nested field may also be named by its "
                "last part where that is unambiguous (dataset=digits, d=64, lr=0.01)."
            )
            formatter.write_paragraph()
            formatter.write_dl(config_rows())


@click.group(
    cls=Commands, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_STATUS_HELP
)
@click.version_option(package_name="creditaudit")
def main() -> None:
    """Train networks with backprop and its alternatives, and audit whether each rule really
    assigns credit. `creditaudit COMMAND --help` for each command."""


# ---------------------------------------------------------------------------------------------
@main.command(cls=FieldHelpCommand, context_settings={"ignore_unknown_options": True})
@click.argument("overrides", nargs=-1)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or per-epoch lines.")
def train(overrides: tuple[str, ...], quiet: bool) -> None:
    """Train one run: creditaudit train rule=dfa arch=resmlp dataset=fashion_mnist epochs=3 seed=42

    The run lives in RESULTS/SETTING/RULE__ARCH__sSEED/. A finished run is skipped; a killed one
    resumes from its last checkpoint.

    Exit status: 0 the run finished; 1 it failed, diverged or was interrupted; 2 an error you can
    fix (one line), e.g. its folder is held by another process.
    """
    from creditaudit import api

    cfg = api.make_config(*overrides)
    run = _train_with_progress(cfg, quiet)
    colour = {"finished": "green", "diverged": "yellow"}.get(run.status, "red")
    acc = run.final.get("test/acc")
    acc_text = f"test acc {acc:.4f}, " if acc is not None else ""
    console.print(
        f"[{colour}]{run.status}[/]: {run.run} — {acc_text}{run.epochs_done} epochs, "
        f"{run.wall_s:.1f} s — {cfg.results}/{cfg.setting}/{run.run}"
    )
    if run.status != "finished":
        sys.exit(RUNS_FAILED)


def _sizes(cfgs) -> str:
    """What the runs about to train read and for how long: "mnist1d, 30 epochs each", or the range
    when the settings' epochs differ ("fashion_mnist, 2–6 epochs")."""
    datasets = ", ".join(sorted({c.data.dataset for c in cfgs}))
    epochs = sorted({c.epochs for c in cfgs})
    if len(epochs) == 1:
        return f"{datasets}, {epochs[0]} epochs each"
    return f"{datasets}, {epochs[0]}–{epochs[-1]} epochs"


def _train_with_progress(cfg, quiet: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from creditaudit import api
    from creditaudit.training.trainer import Reporter

    show_bar = cfg.progress and not quiet and console.is_terminal
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not show_bar,
    )
    task = None
    state = {"epoch": 0, "start": 0}  # epochs completed; epoch this session started from

    def on_start(run, how: str) -> None:
        nonlocal task
        if how == "skipped":
            if not quiet:
                console.print("run already finished: skipped (delete its folder to train again)")
            return
        state["epoch"] = state["start"] = run.epoch
        if not quiet:
            console.print(
                f"{how} {cfg.rule} on {cfg.arch}/{cfg.data.dataset}, seed {cfg.seed}, "
                f"{cfg.epochs} epochs, device {run.device}"
                + (f", from epoch {run.epoch}" if run.epoch else "")
            )
        task = progress.add_task("", total=len(run.loader) * (cfg.epochs - run.epoch))

    def on_step(i: int, n: int, loss: float, acc: float) -> None:
        if task is not None:
            progress.update(
                task,
                completed=(state["epoch"] - state["start"]) * n + i,
                description=f"epoch {state['epoch'] + 1}/{cfg.epochs} loss {loss:.4f} acc {acc:.3f}",
            )

    def on_epoch(run, record: dict) -> None:
        state["epoch"] = run.epoch
        if not quiet:
            progress.console.print(
                f"epoch {record['epoch']:>3}/{cfg.epochs}  train loss "
                f"{record['train/loss']:.4f} acc {record['train/acc']:.4f}"
                f"  test loss {record['test/loss']:.4f} acc {record['test/acc']:.4f}  {record['time/epoch_s']:.1f} s"
            )

    with progress:
        return api.train(
            cfg,
            reporter=Reporter(
                on_start=on_start, on_step=on_step if show_bar else None, on_epoch=on_epoch
            ),
        )


# ---------------------------------------------------------------------------------------------
@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1)
@click.option(
    "--rule",
    "rules",
    multiple=True,
    help=(
        "Audit this rule (a name, or the path of a .py file with your own rule) instead of the "
        "profile's (the main six by default); repeatable."
    ),
)
@click.option(
    "--rules",
    "rule_list",
    default="",
    help="Comma-separated rules to audit, or `all`: every registered rule "
    "(the study's six, the field's other families, your plugins).",
)
@click.option(
    "--profile",
    default="default",
    show_default=True,
    help="default | double | paper | mnist1d (the study's findings on a laptop) | mode1 (bp, fa, dfa on a recipe "
    "where DFA shows Mode 1; see docs/audit.md).",
)
@click.option(
    "--seeds",
    type=SeedList(),
    default="42,123,456",
    show_default=True,
    help="Comma-separated seeds.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Parallel single-thread training processes (0 = one per CPU core).",
)
@click.option(
    "--out",
    default="",
    help="Where the reports go, one folder per setting (default: <results>/_reports).",
)
@click.option(
    "--own-baseline",
    is_flag=True,
    help="D3 against each rule's own <rule>_frozen instead of bp_frozen.",
)
@click.option(
    "--d1",
    cls=ThresholdOption,
    threshold="d1_ratio",
    help="D1 threshold on max ‖h_l‖/‖h_(l-1)‖.",
)
@click.option("--d2", cls=ThresholdOption, threshold="d2_norm", help="D2 threshold on ‖g_L‖.")
@click.option(
    "--d3",
    cls=ThresholdOption,
    threshold="d3_pp",
    help="D3 threshold on depth utility, percentage points.",
)
@click.option(
    "--mode2", cls=ThresholdOption, threshold="mode2_cos", help="Mode 2 threshold on |deep cos|."
)
@click.option(
    "--no-legend",
    "legend",
    is_flag=True,
    flag_value=False,
    default=True,
    help="Leave out the legend under the audit table (what its columns, verdicts and claims mean).",
)
def audit(
    args, rules, rule_list, profile, seeds, workers, out, own_baseline, d1, d2, d3, mode2, legend
) -> None:
    """Train and audit: creditaudit audit [RESULTS_DIR] [key=value ...]

    Without RESULTS_DIR: trains the main audit (bp, fa, dfa, ep, sb, cb × 3 seeds and the bp_frozen
    baseline; finished runs are reused) on the default dataset, prints the audit table and writes the
    report (Markdown, HTML with plots); `--profile mode1` trains bp, fa and dfa (and the baseline)
    where DFA's failure modes show on a CPU. With RESULTS_DIR: re-audits the finished runs found
    there, training nothing. key=value overrides go to every run (e.g. epochs=3 train_subset=5000).

    Exit status: 0 every run finished and the report is written; 1 some run failed or diverged (the
    report is written from the others); 2 an error you can fix (one line) — with RESULTS_DIR, also
    when no run there has finished; 3 nothing failed but some runs are held by another process; 130
    interrupted.
    """
    from creditaudit import api
    from creditaudit.diagnostics.verdict import Thresholds

    results_dir = [a for a in args if "=" not in a]
    overrides = tuple(a for a in args if "=" in a)
    if len(results_dir) > 1:
        raise click.UsageError(f"at most one RESULTS_DIR, got {', '.join(results_dir)}")
    th = Thresholds(d1_ratio=d1, d2_norm=d2, d3_pp=d3, mode2_cos=mode2)
    if results_dir:
        try:
            result = api.report(
                results_dir[0], thresholds=th, own_baseline=own_baseline, out=out or None
            )
        except api.NothingToAudit as e:
            _say_skipped(e.problems)
            raise  # one error line, exit status 2
        _show_audit(result, legend)
        sys.exit(OK)
    if not seeds:
        raise click.BadParameter("name at least one seed, e.g. 42,123,456", param_hint="--seeds")
    if rule_list.strip() == "all":
        rules = (*rules, "all")
    elif rule_list:
        rules = (*rules, *(r.strip() for r in rule_list.split(",") if r.strip()))
    cfgs = api.audit_configs(
        rules or None, profile=profile, seeds=seeds, own_baseline=own_baseline, overrides=overrides
    )
    statuses = _train_all(cfgs, workers)
    try:
        _show_audit(
            api.report(
                cfgs[0].results,
                setting=cfgs[0].setting,
                thresholds=th,
                own_baseline=own_baseline,
                out=out or None,
            ),
            legend,
        )
    except api.NothingToAudit as e:  # every run failed: said above, run by run, and here once
        _say_skipped(e.problems)
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
    sys.exit(runs_status(statuses))


def _train_all(
    cfgs,
    workers: int,
    *,
    ray_address: str | None = None,
    gpus_per_run: float = 0.0,
    stack: int = 1,
    graph: bool = False,
) -> list[str]:
    """Train ``cfgs`` with one live progress line for the whole job — runs finished / total, failed,
    elapsed, and an ETA from the epochs trained so far — in a terminal; a plain line per run with
    the same counts when piped. Local worker processes, or Ray tasks when ``ray_address`` is given
    ('' = $RAY_ADDRESS or a local Ray instance); ``stack`` runs of one kind per job at most
    (jobs/packing.py). Returns every run's outcome status."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from creditaudit import api
    from creditaudit.config import run_path
    from creditaudit.jobs import JobProgress

    def label(c) -> str:
        return f"{run_path(c).parent.name}/{run_path(c).name}"

    # Runs finished before: reused, said once, never handed to a worker (nor listed with old times).
    job = JobProgress({})
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[state]}"),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
    ) as progress:
        task = progress.add_task("runs", total=None, state="", visible=False)

        def start(todo, reused) -> None:
            runs = "run" if len(reused) == 1 else "runs"
            what = f"{len(reused)} finished {runs} reused (delete a run's folder to train it again)"
            if not todo:
                progress.console.print(f"nothing to train: {what}")
                return
            job.epochs.update({label(c): c.epochs for c in todo})
            progress.console.print(
                f"training {len(todo)} run{'' if len(todo) == 1 else 's'} ({_sizes(todo)})"
                + (f"; {what}" if reused else "")
            )
            progress.update(task, total=len(todo), state=job.state(), visible=True)

        def done(outcome, i, n):
            job.update(outcome.run, outcome.status)
            progress.update(task, advance=1, state=job.state())
            colour = {"finished": "green", "locked": "yellow"}.get(outcome.status, "red")
            counts = "" if console.is_terminal else f"  [{job.line()}]"
            progress.console.print(
                f"  [{colour}]{outcome.status:>9}[/] {outcome.run}  {outcome.wall_s:.0f} s"
                + (
                    f"  {escape(outcome.error.splitlines()[0])}"
                    if outcome.error and outcome.status != "finished"
                    else ""
                )
                + escape(counts)
            )

        def say(line: str) -> None:  # what a worker wrote to stderr, above the bar
            progress.console.print(f"  {escape(line)}")

        def died(line: str) -> None:
            job.deaths += 1
            progress.update(task, state=job.state())
            progress.console.print(f"  [yellow]{escape(line)}[/]")

        result = api.train_many(
            cfgs,
            workers=workers,
            backend="local" if ray_address is None else "ray",
            address=ray_address or None,
            gpus_per_run=gpus_per_run,
            stack=stack,
            graph=graph,
            on_start=start,
            on_done=done,
            say=say,
            died=died,
        )
    if result.outcomes:
        console.print(job.line())
    return result.statuses


def _say_skipped(problems: list[str]) -> None:
    for problem in problems:
        console.print(f"  [yellow]skipped[/] {escape(problem)}")


def _show_audit(result, legend: bool = True) -> None:
    """Print an audit's tables (one per setting), what was skipped, where the reports are, and the
    legend once under the last table (the thresholds are the same for every setting)."""
    from creditaudit.reports.terminal import audit_legend, audit_table

    for audit, paths in zip(result.audits, result.reports, strict=True):
        show(audit_table(audit, f"audit — {audit.setting}"))  # the folder is on the report line
        for p in audit.problems:
            err_console.print(f"[yellow]skipped:[/] {escape(p)}")
        for p in audit.unevaluated():
            err_console.print(f"[yellow]D3 not evaluated:[/] {escape(p)}")
        console.print(f"report: {paths['markdown']} and {paths['html']}")
    if legend and result.audits:
        show(audit_legend(result.audits[-1]))


# ---------------------------------------------------------------------------------------------
@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1)
@click.option(
    "--profile",
    default="cpu",
    show_default=True,
    help="paper | cpu | smoke | mnist1d: data and epochs, never definitions (`creditaudit list`).",
)
@click.option(
    "--backend",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: worker processes on this machine; ray: one Ray task per job (a run, or a stack with --stack).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="local: parallel single-thread processes (0 = one per CPU core); ray without --address: "
    "CPUs of the local Ray instance started (0 = all).",
)
@click.option(
    "--address",
    default=None,
    help="ray: the cluster to use (host:port, ray://host:port or auto; "
    "default $RAY_ADDRESS, else a local Ray instance). The results folder must be on a file "
    "system every node sees at the same path.",
)
@click.option(
    "--gpus-per-run",
    default=0.0,
    show_default=True,
    help="ray: GPUs each task (a run or a stack) reserves (with device=cuda).",
)
@click.option(
    "--stack",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Train runs of one kind (same rule, architecture, sizes, data, schedule; other seeds or λ) as one "
    "program, at most N per stack (on a GPU, where it fills the card: 16); 1 = a run per job. Rules that "
    "cannot stack run alone (`creditaudit list` says which; docs/performance.md).",
)
@click.option(
    "--graph",
    is_flag=True,
    help=(
        "On CUDA, replay each stack's step as a CUDA graph (one launch per step; not yet "
        "measured, hence off by default)."
    ),
)
@click.option(
    "--with-baselines",
    is_flag=True,
    help="Also train the frozen-blocks baseline (bp_frozen) each run's D3 needs, where the folder lacks it: taken "
    "from frozen_baselines when the registry has it, else an added control in <results>/controls/.",
)
@click.option(
    "--dry-run", is_flag=True, help="List the runs (and which are finished) without training."
)
def sweep(
    args, profile, backend, workers, address, gpus_per_run, stack, graph, with_baselines, dry_run
) -> None:
    """Train experiment settings: creditaudit sweep SETTING... [key=value ...]

    Each setting of the study (`creditaudit list`) expands, under the profile, into its runs in
    <results>/<setting>/. Idempotent: finished runs are skipped and killed ones resume; a run another
    process is training is left to it; a run that fails or diverges is recorded and the rest go on; a
    worker process that dies (killed, out of memory) costs its own job only, which starts again once
    in a fresh worker. Use `all` for every setting.

    Exit status: 0 every run finished; 1 some run failed, diverged or lost its worker twice; 2 an
    error you can fix (one line); 3 nothing failed but some runs are held by another process; 130
    interrupted.
    """
    from creditaudit import api
    from creditaudit.config import run_path
    from creditaudit.experiments import profile_notes, study_settings

    names = [a for a in args if "=" not in a]
    overrides = tuple(a for a in args if "=" in a)
    if not names:
        raise click.UsageError("name at least one setting (see `creditaudit list`), or `all`")
    if names == ["all"]:
        names = study_settings()
    cfgs = api.plan(
        *names, profile=profile, with_baselines=with_baselines, overrides=overrides
    )  # baselines first
    for line in (line for n in names for line in profile_notes(n, profile)):
        console.print(escape(line))
    _, done = api.split_finished(cfgs)
    added = sum(c.setting not in names for c in cfgs)
    extra = f" (with {added} baseline run(s))" if with_baselines else ""
    console.print(
        f"{len(cfgs)} runs{extra} in {len(names)} setting(s), profile {profile}: {len(done)} "
        f"finished, {len(cfgs) - len(done)} to train"
    )
    if dry_run:
        for c in cfgs:
            console.print(
                f"  {'finished' if c in done else 'to train':>9}  {run_path(c)}  ({c.data.dataset}, {c.epochs} epochs)"
            )
        return
    if backend == "ray":
        statuses = _train_all(
            cfgs,
            workers,
            ray_address=address or "",
            gpus_per_run=gpus_per_run,
            stack=stack,
            graph=graph,
        )
    else:
        statuses = _train_all(cfgs, workers, stack=stack, graph=graph)
    sys.exit(runs_status(statuses))


# ---------------------------------------------------------------------------------------------
class ProtocolHelpCommand(click.Command):
    """A command whose --help ends with every exploit-protocol field and its doc."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from creditaudit.exploit.protocol import help_lines

        formatter.write("\nProtocol overrides are key=value:\n\n" + "\n".join(help_lines()) + "\n")


@main.command(cls=ProtocolHelpCommand, context_settings={"ignore_unknown_options": True})
@click.argument("overrides", nargs=-1)
@click.option(
    "--profile",
    default="default",
    show_default=True,
    help="smoke | default | paper (docs/exploit.md).",
)
@click.option(
    "--seeds",
    type=SeedList(),
    default="",
    help="Comma-separated seeds (default: the profile's; 42,123,456).",
)
@click.option(
    "--results",
    default="results",
    show_default=True,
    help="Results folder; the study goes to RESULTS/_exploit/PROFILE/.",
)
@click.option("--out", default="", help="The study's folder instead (it holds one protocol).")
@click.option(
    "--snapshot",
    default="",
    help="A finished run folder (or a checkpoint in it) to measure instead of training BP snapshots.",
)
@click.option(
    "--render",
    "render_dir",
    default="",
    help="Re-render DIR/exploit.md from DIR alone: trains and measures nothing.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Parallel single-thread processes (0 = one per CPU core).",
)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda | cuda:N.")
def exploit(overrides, profile, seeds, results, out, snapshot, render_dir, workers, device) -> None:
    """Snapshot exploitability: creditaudit exploit [--profile default] [key=value ...]

    Trains a BP snapshot per seed (final, and an early epoch), fits the dfa, cb, vec and oracle bp
    credits on its frozen features, reports Γ and ρ, then takes k = 1, 5, 20 local steps with inner,
    shift(η) and cosine and reports the real change of the held-out loss. Writes exploit.md (the
    memo's two tables) into the study's folder. Finished measurements are reused.

    Exit status: 0 every snapshot and measurement finished; 1 some failed; 2 an error you can fix;
    3 some are held by another process; 130 interrupted.
    """
    from creditaudit.exploit import protocol

    if render_dir:
        from creditaudit.exploit.report import write_report

        if overrides or snapshot:
            raise click.UsageError(
                "--render takes no overrides and no --snapshot: it only re-renders DIR"
            )
        if not Path(render_dir).is_dir():
            raise MissingPathError(f"--render {render_dir}: no such folder")
        path = write_report(render_dir)
        console.print(path.read_text(encoding="utf-8"), markup=False, soft_wrap=True)
        console.print(f"report: {path}")
        return
    from creditaudit.exploit.runner import default_out, given_snapshot, run_exploit

    if not out and not results.strip():
        raise click.BadParameter(
            "is empty: name the results folder (or give --out DIR)", param_hint="--results"
        )
    p = protocol.checked(protocol.profile(profile), overrides)
    if snapshot:
        p = given_snapshot(p, snapshot)
    seed_list = seeds or protocol.profile_seeds(profile)
    folder = Path(out) if out else default_out(p, results)
    console.print(
        f"exploit ({p.name}): {p.dataset}, seeds {', '.join(map(str, seed_list))} -> "
        f"{folder}; finished measurements are reused"
    )

    def done(o) -> None:
        colour = "green" if o.status == "finished" else "red"
        console.print(
            f"  [{colour}]{o.status:>9}[/] {o.unit}  {o.wall_s:.0f} s"
            + (f"  {o.error.splitlines()[0]}" if o.error and o.status != "finished" else "")
        )

    outcomes = run_exploit(p, seed_list, folder, workers=workers, device=device, on_done=done)
    path = protocol.ExploitFolder(folder).report_path
    console.print(path.read_text(encoding="utf-8"), markup=False, soft_wrap=True)
    console.print(f"report: {path}")
    sys.exit(runs_status([o.status for o in outcomes]))


# ---------------------------------------------------------------------------------------------
@main.command()
@click.argument("results", default="results")
@click.option(
    "--out", default="", help="Where to write it (default: RESULTS/_reports/TRAINING_INVENTORY.md)."
)
@click.option(
    "--plan",
    is_flag=True,
    help="Print the counts the registry's settings would produce under --profile, "
    "training and reading nothing (check a plan against the study's inventory).",
)
@click.option(
    "--profile",
    default="paper",
    show_default=True,
    help="With --plan: paper | cpu | smoke | mnist1d.",
)
@click.option(
    "--with-baselines",
    is_flag=True,
    help="With --plan: count the D3 baselines a sweep --with-baselines adds.",
)
def inventory(results, out, plan, profile, with_baselines) -> None:
    """Write TRAINING_INVENTORY.md from a results folder alone: creditaudit inventory [RESULTS]

    Summary counts, runs by method, architecture, setting and dataset, the key tables (FA vs DFA,
    functional triangulation), file locations and device-hours from the logged wall time. Trains
    nothing; unreadable or unfinished run folders are listed, never fatal. With --plan, the counts
    of every setting of the registry under --profile instead, from the registry alone.
    """
    from creditaudit import api

    if plan:
        from creditaudit.experiments import profile_notes, study_settings
        from creditaudit.reports.inventory import plan_markdown
        from creditaudit.runs.io import atomic_write_text

        cfgs = api.plan("all", profile=profile, with_baselines=with_baselines, results=results)
        notes = [line for n in study_settings() for line in profile_notes(n, profile)]
        text = plan_markdown(
            cfgs,
            title=f"every setting, profile {profile}"
            + (", with baselines" if with_baselines else ""),
            notes=notes,
        )
        if out:
            atomic_write_text(Path(out), text)
        if console.is_terminal:  # rendered: headings, and tables whose cells wrap at spaces
            from rich.markdown import Markdown

            console.print(Markdown(text))
        else:  # the Markdown itself, for a file or a diff
            console.print(text, markup=False, soft_wrap=True)
        return

    made = api.inventory(results, out=out or None)
    console.print(
        f"{made.runs} runs ({made.finished} finished) in {results}; {len(made.problems)} folder(s) skipped"
    )
    for problem in made.problems:
        console.print(f"  [yellow]skipped[/] {escape(problem)}")
    console.print(f"inventory: {made.path}")


@main.command()
@click.argument("results", default="results")
@click.option(
    "--out", default="", help="Where to write tables.md (default: RESULTS/_reports/tables.md)."
)
@click.option(
    "--table",
    "names",
    multiple=True,
    help="Only these tables (repeatable): table1, fa_vs_dfa, penalty_sweep, depth_sweep, cross_arch, triangulation.",
)
@click.option(
    "--triangulate",
    default="",
    help="Setting for the functional triangulation (default: penalty_rescue, else main_audit).",
)
@click.option(
    "--no-legend",
    "legend",
    is_flag=True,
    flag_value=False,
    default=True,
    help="Leave out the legend under the audit table (what its columns, verdicts and claims mean).",
)
def tables(results, out, names, triangulate, legend) -> None:
    """Write the study's tables from a results folder alone: creditaudit tables [RESULTS]

    Table 1 (main audit), FA vs DFA, penalty sweep, depth sweep, cross-architecture and the
    functional triangulation, each mean ± std (ddof=1) with n. Trains nothing.
    """
    from creditaudit import api
    from creditaudit.diagnostics.verdict import Thresholds
    from creditaudit.reports.audit import build_audit
    from creditaudit.reports.terminal import audit_legend, audit_table, plain, study_table

    th = Thresholds()
    made = api.tables(
        results, names=names, out=out or None, triangulate=triangulate or None, thresholds=th
    )
    for t in made.tables:
        main_audit = (
            build_audit(made.collection, setting="main_audit", thresholds=th)
            if t.key == "table1" and t.rows
            else None
        )
        if t.rows:
            show(
                audit_table(main_audit, t.title)
                if main_audit
                else study_table(t.title, t.header, t.rows, t.terminal)
            )
        else:
            console.print(f"[bold]{t.title}[/]: no finished runs for this table")
        for note in t.notes:
            console.print(f"  {plain(note)}", markup=False)
        if main_audit and legend:
            show(audit_legend(main_audit))
        console.print()
    for problem in made.skipped:
        console.print(f"  [yellow]skipped[/] {escape(problem)}")
    console.print(f"tables: {made.path}")


@main.command()
@click.argument("results", default="results")
@click.option(
    "--format", "fmt", type=click.Choice(["parquet", "csv"]), default="parquet", show_default=True
)
@click.option(
    "--out", default="", help="The file to write (default: RESULTS/_reports/runs.<format>)."
)
@click.option("--setting", "settings", multiple=True, help="Only these settings (repeatable).")
def export(results, fmt, out, settings) -> None:
    """Every run × epoch of a results folder as one table: creditaudit export [RESULTS] [--format parquet|csv]

    One row per run and logged epoch: setting, run, rule, arch, seed, status, the resolved config as
    config.* columns and every metric (train/*, test/*, diag/*, credit/*, rule/*, time/*). Read it with
    pandas, DuckDB or Polars; in Python, creditaudit.results.load(RESULTS) gives the same DataFrame.
    """
    from creditaudit.results import export as write

    _require_results(results)
    path, n, problems = write(
        results,
        Path(out) if out else Path(results) / "_reports" / f"runs.{fmt}",
        fmt,
        list(settings) or None,
    )
    console.print(f"{n} rows ({fmt}) -> {path}")
    for problem in problems:
        err_console.print(f"[yellow]skipped:[/] {problem}")


def _require_results(results: str) -> Path:
    from creditaudit.api import require_results

    return require_results(results)


# ---------------------------------------------------------------------------------------------
@main.command(name="check-rule")
@click.argument("rule")
@click.option(
    "--rule", "name", default=None, help="The rule to check when the file registers several."
)
@click.option(
    "--arch",
    "archs",
    multiple=True,
    help="Architecture to check on (repeatable; default: resmlp, smallcnn, vit_mini).",
)
@click.option(
    "--no-variants",
    is_flag=True,
    help="Check the rule alone, not also its _frozen and _shallow variants.",
)
def check_rule_cmd(rule: str, name: str | None, archs: tuple[str, ...], no_variants: bool) -> None:
    """Check a rule against creditaudit's contract: creditaudit check-rule RULE

    RULE is a rule file (path/to/my_rule.py) or a registered name. The conformance kit
    (creditaudit.testing.check_rule) trains seconds-long runs on the bundled digits: options
    typed and documented, one step moves what it should, credits of the right shapes, finite and
    detached, no layer left patched, same seed same metrics, a checkpoint resumes bit for bit, and
    the rule stacks if it says it can. Each failure says what to fix.

    Exit status: 0 every check passed; 1 some check failed; 2 an error you can fix (one line).
    """
    from creditaudit.rules import load_rule_file
    from creditaudit.testing import DEFAULT_ARCHS, check_rule, resolve_rule

    if name is not None and rule.endswith(".py"):
        load_rule_file(rule)
    label = name or resolve_rule(rule)
    results = check_rule(
        label, archs=archs or DEFAULT_ARCHS, variants=not no_variants, raise_on_failure=False
    )
    for c in results:
        mark = "[green]ok  [/]" if c.passed else "[bold red]FAIL[/]"
        console.print(
            f"{mark} {escape(c.name)}" + (f": {escape(c.detail)}" if c.detail else ""),
            soft_wrap=True,
        )
    failed = sum(not c.passed for c in results)
    if failed:
        console.print(f"[bold red]{escape(label)}: {failed} of {len(results)} checks failed[/]")
        sys.exit(RUNS_FAILED)
    console.print(f"[green]{escape(label)}: {len(results)} of {len(results)} checks passed[/]")


# ---------------------------------------------------------------------------------------------
@main.command(name="list")
@click.option(
    "--options",
    "-o",
    is_flag=True,
    help="Also list every rule's options with defaults and meaning.",
)
def list_(options: bool) -> None:
    """List rules, architectures and datasets by name, with a one-line summary each."""
    import dataclasses

    from creditaudit.data import DATASETS
    from creditaudit.experiments import PROFILES, SETTINGS
    from creditaudit.models import ARCHS
    from creditaudit.rules import RULES, VARIANTS

    registries: list[tuple[str, Registry[Any]]] = [
        ("rules", RULES),
        ("architectures", ARCHS),
        ("datasets", DATASETS),
        ("settings", SETTINGS),
    ]
    for title, registry in registries:
        table = Table(
            title=title, title_justify="left", show_header=False, box=None, pad_edge=False
        )
        table.add_column(style="bold")
        table.add_column()
        for entry in registry.entries():
            table.add_row(entry.name, entry.summary)
            if options and registry is RULES:
                for f in dataclasses.fields(entry.obj.Options):
                    default = (
                        f.default
                        if f.default is not dataclasses.MISSING
                        else f.default_factory()
                        if f.default_factory is not dataclasses.MISSING
                        else "(required)"
                    )
                    table.add_row(
                        "", f"[dim]{entry.name}.{f.name}={default}  {f.metadata.get('help', '')}[/]"
                    )
        show(table)
        if registry is RULES:
            console.print(
                f"  every rule also as <rule>_{' and <rule>_'.join(VARIANTS)}: blocks frozen at init, or L=0"
                + ("" if options else "; `creditaudit list --options` shows each rule's options"),
                soft_wrap=False,
            )  # a listing's prose: wrapped to the width, piped or not
            console.print()
            stacking = Table(
                title="stacks (sweep --stack N: runs of one kind as one program)",
                title_justify="left",
                show_header=False,
                box=None,
                pad_edge=False,
            )
            stacking.add_column(style="bold")
            stacking.add_column()
            stacking.add_row(
                "stack",
                ", ".join(e.name for e in RULES.entries() if e.obj.stack_refusal is None)
                + " (and their variants), on every architecture",
            )
            for entry in RULES.entries():
                if entry.obj.stack_refusal:
                    stacking.add_row(entry.name, f"alone: {entry.obj.stack_refusal}")
            show(stacking)
        console.print()
    profiles = Table(
        title="profiles (--profile NAME, for the commands named)",
        title_justify="left",
        show_header=False,
        box=None,
        pad_edge=False,
    )
    profiles.add_column(style="bold")
    profiles.add_column(style="dim")
    profiles.add_column()
    for profile in PROFILES.entries():
        profiles.add_row(profile.name, ", ".join(sorted(profile.obj.commands)), profile.summary)
    show(profiles)


# ---------------------------------------------------------------------------------------------
@main.group()
def data() -> None:
    """Check for or fetch a dataset."""


@data.command()
@click.argument("name")
@click.option(
    "--data-dir",
    default="",
    help="Where datasets live (default: $CREDITAUDIT_DATA_DIR or ~/.cache/creditaudit/data).",
)
def check(name: str, data_dir: str) -> None:
    """Exit 0 when dataset NAME is present, 1 when it is missing."""
    from creditaudit.data import DATASETS, check_dataset

    DATASETS.get(name)
    where = check_dataset(name, data_dir)
    if where is None:
        console.print(f"{name}: missing (run `creditaudit data fetch {name}`)")
        sys.exit(1)
    console.print(f"{name}: {where}")


@data.command()
@click.argument("name")
@click.option(
    "--data-dir",
    default="",
    help="Where datasets live (default: $CREDITAUDIT_DATA_DIR or ~/.cache/creditaudit/data).",
)
def fetch(name: str, data_dir: str) -> None:
    """Make dataset NAME present: found locally, or downloaded and checksum-verified."""
    from creditaudit.data import DATASETS, fetch_dataset

    DATASETS.get(name)
    where = fetch_dataset(name, data_dir)
    console.print(f"{name}: {where}")


if __name__ == "__main__":
    main()
