"""The ``creditaudit`` command line: ``train``, ``list``, ``data``.

Every command turns the errors a user can act on (an unknown name, a bad value, a missing dataset,
a run folder that disagrees with the config) into one line naming the fix, and exit status 2.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager

import click
from rich.console import Console
from rich.table import Table

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def user_errors() -> tuple[type[BaseException], ...]:
    from creditaudit.errors import ConfigError
    from creditaudit.data import DatasetMissingError
    from creditaudit.registry import UnknownNameError
    from creditaudit.runs.folder import RunLockedError
    from creditaudit.runs.io import CorruptRunError
    from creditaudit.train.trainer import RunConfigMismatch

    return (ConfigError, UnknownNameError, DatasetMissingError, RunConfigMismatch, RunLockedError, CorruptRunError)


@contextmanager
def friendly_errors():
    try:
        yield
    except user_errors() as exc:
        err_console.print(f"[bold red]error:[/] {exc}", markup=True, soft_wrap=True)
        sys.exit(2)


def config_help() -> str:
    from creditaudit.config import help_rows

    lines = ["Overrides are key=value; a key is a field name below (or its dotted path).", ""]
    width = max(len(k) for k, *_ in help_rows())
    for key, tname, default, text in help_rows():
        lines.append(f"  {key:<{width}}  {text} [{tname}, default {default}]")
    return "\n".join(lines)


class FieldHelpCommand(click.Command):
    """A command whose --help ends with every config field and its doc, unwrapped."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write("\n" + config_help() + "\n")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
    """
    from creditaudit.config import TrainConfig, apply_overrides

    with friendly_errors():
        cfg = apply_overrides(TrainConfig(), overrides)
        summary = _train_with_progress(cfg, quiet)
    status = summary["status"]
    final = summary.get("final") or {}
    colour = {"finished": "green", "diverged": "yellow"}.get(status, "red")
    acc = final.get("test/acc")
    acc_text = f"test acc {acc:.4f}, " if acc is not None else ""
    console.print(f"[{colour}]{status}[/]: {summary['run']} — {acc_text}{summary['epochs_done']} epochs, "
                  f"{summary['wall_s']:.1f} s — {cfg.results}/{cfg.setting}/{summary['run']}")
    if status not in ("finished",):
        sys.exit(1)


def _train_with_progress(cfg, quiet: bool) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from creditaudit.train.trainer import Reporter, train

    show_bar = cfg.progress and not quiet and console.is_terminal
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=True, disable=not show_bar,
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
            console.print(f"{how} {cfg.rule} on {cfg.arch}/{cfg.data.dataset}, seed {cfg.seed}, "
                          f"{cfg.epochs} epochs, device {run.device}" + (f", from epoch {run.epoch}" if run.epoch else ""))
        task = progress.add_task("", total=len(run.loader) * (cfg.epochs - run.epoch))

    def on_step(i: int, n: int, loss: float, acc: float) -> None:
        if task is not None:
            progress.update(task, completed=(state["epoch"] - state["start"]) * n + i,
                            description=f"epoch {state['epoch'] + 1}/{cfg.epochs} loss {loss:.4f} acc {acc:.3f}")

    def on_epoch(run, record: dict) -> None:
        state["epoch"] = run.epoch
        if not quiet:
            progress.console.print(
                f"epoch {record['epoch']:>3}/{cfg.epochs}  train loss {record['train/loss']:.4f} acc {record['train/acc']:.4f}"
                f"  test loss {record['test/loss']:.4f} acc {record['test/acc']:.4f}  {record['time/epoch_s']:.1f} s"
            )

    with progress:
        return train(cfg, reporter=Reporter(on_start=on_start, on_step=on_step if show_bar else None, on_epoch=on_epoch))


# ---------------------------------------------------------------------------------------------
@main.command(name="list")
@click.option("--options", "-o", is_flag=True, help="Also list every rule's options with defaults and meaning.")
def list_(options: bool) -> None:
    """List rules, architectures and datasets by name, with a one-line summary each."""
    import dataclasses

    from creditaudit.data import DATASETS
    from creditaudit.models import ARCHS
    from creditaudit.rules import RULES, VARIANTS

    for title, registry in (("rules", RULES), ("architectures", ARCHS), ("datasets", DATASETS)):
        table = Table(title=title, title_justify="left", show_header=False, box=None, pad_edge=False)
        table.add_column(style="bold")
        table.add_column()
        for entry in registry.entries():
            table.add_row(entry.name, entry.summary)
            if options and registry is RULES:
                for f in dataclasses.fields(entry.obj.Options):
                    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
                    table.add_row("", f"[dim]{entry.name}.{f.name}={default}  {f.metadata.get('help', '')}[/]")
        console.print(table)
        if registry is RULES:
            console.print(f"  every rule also as <rule>_{' and <rule>_'.join(VARIANTS)}: blocks frozen at init, or L=0"
                          + ("" if options else "; `creditaudit list --options` shows each rule's options"))
        console.print()


# ---------------------------------------------------------------------------------------------
@main.group()
def data() -> None:
    """Check for or fetch a dataset."""


@data.command()
@click.argument("name")
@click.option("--data-dir", default="", help="Where datasets live (default: $CREDITAUDIT_DATA_DIR or ~/.cache/creditaudit/data).")
def check(name: str, data_dir: str) -> None:
    """Exit 0 when dataset NAME is present, 1 when it is missing."""
    from creditaudit.data import DATASETS, check_dataset

    with friendly_errors():
        DATASETS.get(name)
        where = check_dataset(name, data_dir)
    if where is None:
        console.print(f"{name}: missing (run `creditaudit data fetch {name}`)")
        sys.exit(1)
    console.print(f"{name}: {where}")


@data.command()
@click.argument("name")
@click.option("--data-dir", default="", help="Where datasets live (default: $CREDITAUDIT_DATA_DIR or ~/.cache/creditaudit/data).")
def fetch(name: str, data_dir: str) -> None:
    """Make dataset NAME present: found locally, or downloaded and checksum-verified."""
    from creditaudit.data import DATASETS, fetch_dataset

    with friendly_errors():
        DATASETS.get(name)
        where = fetch_dataset(name, data_dir)
    console.print(f"{name}: {where}")


if __name__ == "__main__":
    main()
