"""A finished run is audited only from complete metrics: collect() skips, with the reason, a
finished run whose metrics.jsonl is torn, empty, short of its last epoch or missing, and neither
the audit nor ``creditaudit audit RESULTS`` lists it, counts it in n or gives it a verdict."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from creditaudit.cli import main
from creditaudit.reports.audit import build_audit
from creditaudit.reports.collect import collect
from creditaudit.runs.folder import RunFolder
from tests.conftest import tiny_config
from tests.results_factory import make_run


# ---------------------------------------------------------------------------------------------
# Ways a finished run's metrics.jsonl can be damaged, and the reason collect() must give
# ---------------------------------------------------------------------------------------------
def tear(path: Path) -> None:
    """Cut the last line in the middle of its JSON object (no newline)."""
    lines = path.read_text().splitlines(keepends=True)
    last = lines[-1].rstrip("\n")
    path.write_text("".join(lines[:-1]) + last[: len(last) // 2])


def empty(path: Path) -> None:
    path.write_text("")


def shorten(path: Path) -> None:
    """Drop the last epoch's line (the file stays well formed)."""
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))


def delete(path: Path) -> None:
    path.unlink()


DAMAGE = {  # name -> (damage, what the reason must say beside the file name)
    "torn": (tear, r"torn"),
    "empty": (empty, r"empty"),
    "short": (shorten, r"no line for epoch {last}"),
    "deleted": (delete, r"missing"),
}


def assert_reason(problems: list[str], run: Path, damage: str, last_epoch: int) -> None:
    mine = [p for p in problems if str(run) in p]
    assert len(mine) == 1, problems
    assert "metrics.jsonl" in mine[0] and "skipped" in mine[0], mine[0]
    assert re.search(DAMAGE[damage][1].format(last=last_epoch), mine[0]), mine[0]


def audit_cli(*args: str):
    return CliRunner().invoke(main, ["audit", *args], catch_exceptions=False)


# ---------------------------------------------------------------------------------------------
# A real run, trained once: digits, d=32, 2 epochs
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from creditaudit.training.trainer import train

    cfg = tiny_config(tmp_path_factory.mktemp("trained"), "rule=bp")
    summary = train(cfg)
    assert summary["status"] == "finished" and summary["epochs_done"] == 2
    return Path(cfg.results)


@pytest.fixture
def real_run(trained, tmp_path) -> tuple[Path, Path]:
    """(results folder, run folder): a private copy of the trained run."""
    results = tmp_path / "results"
    shutil.copytree(trained, results)
    return results, results / "adhoc" / "bp__resmlp__s42"


def test_an_intact_real_run_is_collected(real_run):
    results, run = real_run
    col = collect(results)
    assert col.problems == []
    (rec,) = col.runs
    assert rec.path == run and rec.status == "finished"
    assert [r["epoch"] for r in rec.metrics] == [0, 1, 2]


@pytest.mark.parametrize("field, value", [("seed", 7), ("rule", "fa"), ("setting", "main_audit")])
def test_a_run_whose_config_disagrees_with_its_folder_is_skipped_with_a_word(
    real_run, field, value
):
    """A config.json that no longer names its folder (edited, or the folder renamed) is not read as
    that run's: the reports skip it and say why."""
    import json

    results, run = real_run
    config = json.loads((run / "config.json").read_text())
    config[field] = value
    (run / "config.json").write_text(json.dumps(config))
    col = collect(results)
    assert col.runs == []
    (problem,) = col.problems
    assert problem.startswith(
        f"{run}: config.json says {field} {value!r} but the folder is named for {field} "
    )


def test_audit_of_a_folder_of_unfinished_runs_says_so_and_exits_2(tmp_path):
    from creditaudit.training.trainer import train

    cfg = tiny_config(tmp_path, "rule=dfa", "epochs=3", "setting=main_audit")
    assert train(cfg, stop_after=1)["status"] == "interrupted"
    res = audit_cli(cfg.results)
    assert res.exit_code == 2, res.output
    assert (
        "nothing to audit" in res.output
        and "1 interrupted" in res.output
        and "Traceback" not in res.output
    )


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_real_finished_run_with_damaged_metrics_is_skipped(real_run, damage):
    results, run = real_run
    DAMAGE[damage][0](RunFolder(run).metrics_path)
    col = collect(results)
    assert col.runs == []
    assert_reason(col.problems, run, damage, last_epoch=2)
    audit = build_audit(col)
    assert audit.rules == [] and audit.not_finished == []
    # The command line audits nothing: one clear error naming the run and the file, no verdict.
    res = audit_cli(str(results))
    assert res.exit_code == 2, res.output
    assert "no readable run folders" in res.output and "metrics.jsonl" in res.output
    assert "PASS" not in res.output and "Traceback" not in res.output


# ---------------------------------------------------------------------------------------------
# A small study beside it: one seed of a rule damaged, the other intact
# ---------------------------------------------------------------------------------------------
SETTING = "main_audit"


@pytest.fixture
def study(tmp_path) -> tuple[Path, Path]:
    """(results folder, the fa run that the tests damage); every run finished, 3 epochs."""
    for seed in (42, 123):
        for rule in ("bp", "bp_frozen", "fa"):
            make_run(tmp_path, SETTING, rule, seed)
    return tmp_path, tmp_path / SETTING / "fa__resmlp__s123"


def _terminal_n(output: str, rule: str) -> str:
    """The n the audit's terminal table gives ``rule``: in the title when every rule has the same n,
    else in its n column. Words of a title may wrap onto the next line: whitespace, not spaces."""
    m = re.search(r"\(n=(\d+)\s+seeds\s+each", output)
    if m:
        assert any(line.split()[:1] == [rule] for line in output.splitlines()), output
        return m.group(1)
    header = next(
        line.split() for line in output.splitlines() if line.split()[:2] == ["rule", "verdict"]
    )
    rows = [line.split() for line in output.splitlines() if line.split()[:1] == [rule]]
    assert len(rows) == 1, output
    return rows[0][header.index("n")]


@pytest.mark.parametrize("depth", [1, 4])
def test_the_terminal_output_does_not_depend_on_the_folders_path(study, tmp_path_factory, depth):
    """The same study under a short and a long path prints the same lines but for the path itself:
    a path's length never moves a line break (a fresh clone's temporary folder once broke a test)."""
    results, _ = study
    moved = tmp_path_factory.mktemp("moved").joinpath(
        *["a_rather_long_folder_name_" + "x" * 30] * depth, "results"
    )
    shutil.copytree(results, moved)
    outputs = [audit_cli(str(root)) for root in (results, moved)]
    assert [o.exit_code for o in outputs] == [0, 0], [o.output for o in outputs]
    short, long = (
        o.output.replace(str(root), "RESULTS")
        for o, root in zip(outputs, (results, moved), strict=True)
    )
    assert short == long
    (report,) = [line for line in short.splitlines() if line.startswith("report:")]
    assert "RESULTS/_reports/main_audit/audit.md" in report  # one line, whole


def test_an_intact_study_is_collected_and_audited_in_full(study):
    results, run = study
    col = collect(results)
    assert col.problems == [] and len(col.runs) == 6
    fa = {ra.rule: ra for ra in build_audit(col, setting=SETTING).rules}["fa"]
    assert fa.verdict.n == 2 and fa.stats["test_acc"][2] == 2
    assert [ra.run.path for ra in fa.runs] == [results / SETTING / "fa__resmlp__s42", run]
    res = audit_cli(str(results))
    assert res.exit_code == 0, res.output
    assert _terminal_n(res.output, "fa") == "2"


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_seed_is_neither_listed_nor_counted(study, damage):
    results, run = study
    DAMAGE[damage][0](RunFolder(run).metrics_path)
    col = collect(results)
    assert run not in [r.path for r in col.runs] and len(col.runs) == 5
    assert_reason(col.problems, run, damage, last_epoch=3)

    audit = build_audit(col, setting=SETTING)
    fa = {ra.rule: ra for ra in audit.rules}["fa"]
    assert [ra.run.path.name for ra in fa.runs] == ["fa__resmlp__s42"]
    assert fa.verdict.n == 1
    assert all(stat[2] <= 1 for stat in fa.stats.values())  # no figure counts the damaged run
    assert any(str(run) in p for p in audit.problems)

    res = audit_cli(str(results))
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    assert _terminal_n(res.output, "fa") == "1"
    flat = res.output.replace("\n", "")
    assert "skipped:" in res.output and "fa__resmlp__s123" in flat
    report = (results / "_reports" / SETTING / "audit.md").read_text()
    per_run = [line for line in report.splitlines() if line.startswith("| fa__resmlp__s123 ")]
    assert per_run == []  # no row, so no PASS (or any verdict) for the damaged run
    assert "| fa__resmlp__s42 " in report
    skipped = report.split("## Skipped", 1)[1]
    assert "fa__resmlp__s123" in skipped and "metrics.jsonl" in skipped


# ---------------------------------------------------------------------------------------------
# A run still in progress may end in a torn line (a writer mid-append): tolerated, as before
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("status", ["running", "interrupted"])
def test_an_unfinished_run_with_a_torn_last_line_is_still_collected(tmp_path, status):
    make_run(tmp_path, SETTING, "fa", 42, status=status)
    run = tmp_path / SETTING / "fa__resmlp__s42"
    tear(RunFolder(run).metrics_path)
    with RunFolder(run).lock():  # a live process owns it: a "running" summary is believed
        col = collect(tmp_path)
    assert col.problems == []
    (rec,) = col.runs
    assert rec.status == status and [r["epoch"] for r in rec.metrics] == [0, 1]
    audit = build_audit(col, setting=SETTING)
    assert audit.rules == [] and [r.path for r in audit.not_finished] == [run]
