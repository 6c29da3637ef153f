"""The command line: help, list, train, data, and one clear error per user mistake."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from creditaudit.cli import main
from creditaudit.config import TrainConfig
from creditaudit.data import DATASETS
from creditaudit.models import ARCHS
from creditaudit.rules import RULES
from creditaudit.typedconfig import iter_fields


@pytest.fixture
def cli():
    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(main, list(args), catch_exceptions=False)

    return invoke


def test_train_help_lists_every_field_with_its_doc(cli):
    out = cli("train", "--help").output
    flat = " ".join(out.split())
    for path, f, _ in iter_fields(TrainConfig):
        assert f"\n  {path} " in out, path  # the dotted path a user types: diag.every, not every
        assert " ".join(f.metadata["help"].split(" (")[0][:40].split()) in flat, path
    assert max(len(line) for line in out.splitlines()) <= 80  # wrapped as click wraps the options


def test_list_shows_every_registered_name(cli):
    out = cli("list").output
    for name in [*RULES.names(), *ARCHS.names(), *DATASETS.names()]:
        assert name in out
    assert "_frozen" in out and "_shallow" in out
    from creditaudit.experiments import PROFILES, SETTINGS

    for name in [*SETTINGS.names(), *PROFILES.names()]:
        assert name in out
    assert any(
        line.split()[:3] == ["paper", "audit,", "exploit,"] for line in out.splitlines()
    )  # a profile's commands


def test_list_options_shows_an_option_that_has_no_default(cli, monkeypatch):
    """A rule may require an option (given as <rule>.<field>=value): listed as required, where
    reading its default once failed (dataclasses.MISSING is not a factory)."""
    from dataclasses import dataclass, field

    from creditaudit.rules import Rule

    @dataclass
    class NeedsK:
        k: int = field(metadata={"help": "how many, always given"})

    class Needy(Rule):
        Options = NeedsK

    monkeypatch.setattr(RULES, "_entries", dict(RULES._entries))
    RULES.add("needy", Needy, "needs k")
    out = cli("list", "--options").output
    assert "needy.k=(required)  how many, always given" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (("rule=bq",), "unknown rule 'bq'"),
        (("arch=resnet50",), "unknown architecture 'resnet50'"),
        (("dataset=imagenet",), "unknown dataset 'imagenet'"),
        (("epochs=-3",), "epochs must be >= 1"),
        (("batch_size=big",), "expected int"),
        (("nonsense=1",), "unknown config key 'nonsense'"),
    ],
)
def test_train_user_errors_are_one_line_and_exit_2(cli, args, message):
    result = cli("train", *args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_missing_dataset_names_the_fix(cli, tmp_path):
    result = cli("train", "dataset=cifar10", f"data_dir={tmp_path}", f"results={tmp_path / 'r'}")
    assert result.exit_code == 2
    assert "creditaudit data fetch cifar10" in result.output


def test_train_writes_a_run_and_skips_it_next_time(cli, tmp_path):
    args = (
        "train",
        "-q",
        "dataset=digits",
        "d=16",
        "L=1",
        "epochs=1",
        "threads=1",
        f"results={tmp_path / 'r'}",
        f"data_dir={tmp_path / 'd'}",
    )
    first = cli(*args)
    assert first.exit_code == 0, first.output
    assert "finished" in first.output
    folder = tmp_path / "r" / "adhoc" / "bp__resmlp__s42"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["status"] == "finished"
    stamps = {f.name: f.stat().st_mtime_ns for f in folder.rglob("*") if f.is_file()}
    second = cli(*args)
    assert second.exit_code == 0 and "finished" in second.output
    assert {
        f.name: f.stat().st_mtime_ns for f in folder.rglob("*") if f.is_file()
    } == stamps  # nothing rewritten


def test_data_check_and_fetch(cli, tmp_path):
    assert cli("data", "check", "digits").exit_code == 0
    missing = cli("data", "check", "cifar10", "--data-dir", str(tmp_path))
    assert missing.exit_code == 1 and "creditaudit data fetch cifar10" in missing.output
    assert cli("data", "check", "imagenet").exit_code == 2


def test_incompatible_arch_and_data_fail_before_any_file_is_written(cli, tmp_path):
    result = cli(
        "train",
        "arch=smallcnn",
        "dataset=mnist1d",
        f"data_dir={tmp_path / 'd'}",
        f"results={tmp_path / 'r'}",
    )
    assert result.exit_code == 2 and "image inputs" in result.output
    assert not (tmp_path / "r").exists()


def test_audit_prints_a_legend_unless_told_not_to(cli, tmp_path):
    from tests.results_factory import study

    root = study(tmp_path / "results")
    shown = cli("audit", str(root), "--out", str(tmp_path / "reports"), "--d3", "4")
    assert shown.exit_code == 0, shown.output
    assert (
        "fired@ep" in shown.output
        and "needs walk-back" in shown.output
        and "D3 fires below 4" in shown.output
    )
    assert shown.output.count("D3 fires below") == 1  # once, under the last setting's table
    hidden = cli("audit", str(root), "--out", str(tmp_path / "reports"), "--no-legend")
    assert hidden.exit_code == 0 and "D3 fires below" not in hidden.output


def test_finished_runs_are_reused_and_said_so_once(cli, tmp_path, capsys):
    from creditaudit import cli as commands
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path, "epochs=1", "d=16", "L=1")
    assert (
        cli(
            "train",
            "-q",
            *(
                f"{k}={v}"
                for k, v in (
                    ("dataset", "digits"),
                    ("d", 16),
                    ("L", 1),
                    ("epochs", 1),
                    ("batch_size", 64),
                    ("threads", 1),
                    ("results", cfg.results),
                    ("data_dir", cfg.data.data_dir),
                )
            ),
        ).exit_code
        == 0
    )
    capsys.readouterr()
    assert commands._train_all([cfg], workers=1) == ["finished"]
    out = capsys.readouterr().out
    assert (
        out.strip()
        == "nothing to train: 1 finished run reused (delete a run's folder to train it again)"
    )


@pytest.mark.parametrize("command", ["audit", "sweep", "exploit"])
def test_an_unknown_profile_lists_only_the_profiles_the_command_takes(cli, command):
    from creditaudit.experiments import PROFILES, profile_names

    args = {"sweep": ("sweep", "main_audit"), "audit": ("audit",), "exploit": ("exploit",)}[command]
    result = cli(*args, "--profile", "nosuch")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert result.output.startswith("error: unknown profile 'nosuch'")
    listed = result.output.split("one of ", 1)[1]
    takes = profile_names(command)
    assert all(n in listed for n in takes)
    assert not any(
        f" {n}," in f" {listed}" or f" {n} " in f" {listed}"
        for n in PROFILES.names()
        if n not in takes
    )


@pytest.mark.parametrize("args", [("--nosuch",), ("nosuchcmd",), ("data", "nosuch")])
def test_usage_errors_read_error_in_lower_case_everywhere(cli, args):
    result = cli(*args)
    assert result.exit_code == 2
    assert (
        result.output.startswith("error: ")
        and "Error:" not in result.output
        and "Usage:" not in result.output
    )


def test_inventory_plan_renders_in_a_terminal_and_stays_markdown_in_a_pipe(cli, monkeypatch):
    import io

    from rich.console import Console

    from creditaudit import cli as commands

    piped = cli("inventory", "--plan", "--profile", "cpu").output
    assert piped.startswith("# Training Inventory") and "| --- |" in piped  # for a file or a diff
    screen = io.StringIO()
    monkeypatch.setattr(
        commands, "console", Console(file=screen, force_terminal=True, width=80, color_system=None)
    )
    assert cli("inventory", "--plan", "--profile", "cpu").exit_code == 0
    lines = screen.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    text = screen.getvalue()
    assert "# " not in text and "| --- |" not in text and "**" not in text
    words = set(piped.replace("|", " ").replace("*", " ").split())
    shown = [w for w in text.split() if w.isalpha() and len(w) > 3]
    assert shown and all(w in words for w in shown)  # no word broken across lines


def test_piped_tables_take_columns_and_end_without_spaces(cli, monkeypatch):
    import io

    from creditaudit import cli as commands

    monkeypatch.setattr("sys.stdout", io.StringIO())  # a pipe, whatever runs the tests
    monkeypatch.setenv("COLUMNS", "100")
    assert commands._pipe_width() == 100
    monkeypatch.delenv("COLUMNS")
    assert commands._pipe_width() == 160
    out = cli("list").output
    assert out and not any(line != line.rstrip() for line in out.splitlines())


def test_the_training_line_states_each_settings_epochs_or_their_range():
    """Settings of one sweep may train for different epochs: "N epochs each" only when they agree."""
    from creditaudit.cli import _sizes
    from creditaudit.experiments import expand

    one = expand("matched_30ep", profile="mnist1d")
    mixed = one + expand("main_audit", profile="mnist1d")
    assert {c.epochs for c in mixed} == {30, 100}
    assert _sizes(one) == "mnist1d, 30 epochs each"
    assert _sizes(mixed) == "mnist1d, 30–100 epochs"
