"""A run whose summary still says ``running`` after its process died (SIGKILL, out of memory, a lost
node) is reported ``interrupted`` with the command that resumes it; reading changes no file. A run
whose lock a live process holds — or a process on another machine whose lease has not run out —
stays ``running``."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from creditaudit import config, typedconfig
from creditaudit.experiments import expand
from creditaudit.reports.audit import build_audit, html_page
from creditaudit.reports.collect import collect
from creditaudit.reports.inventory import inventory_markdown
from creditaudit.reports.resume import resume_command, unfinished_note
from creditaudit.runs import lock as lmod
from creditaudit.runs.folder import RunFolder

SRC = str(Path(lmod.__file__).resolve().parents[2])  # the `src` folder, for child processes


def _sweep_run(root: Path, setting: str = "main_audit", profile: str = "smoke") -> RunFolder:
    """The folder of one run a sweep of ``setting`` trains, with the config the trainer records."""
    cfg = config.resolve_rule_options(expand(setting, profile=profile, results=str(root))[0])
    folder = RunFolder(config.run_path(cfg))
    folder.write_config(config.to_dict(cfg))
    folder.append_metrics({"epoch": 0, "test/acc": 0.1})
    return folder


class Holder:
    """A child process that takes a run folder's lock and writes a ``running`` summary, as the
    trainer does, then waits (until killed, or until its stdin closes)."""

    def __init__(self, folder: RunFolder):
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(f"""
                import sys
                sys.path.insert(0, {SRC!r})
                from creditaudit.runs.folder import RunFolder
                folder = RunFolder({str(folder.path)!r})
                lock = folder.lock()
                lock.acquire()
                folder.write_summary({{"run": folder.name, "status": "running", "epochs_done": 0,
                                       "wall_s": 1.0}})
                print("running", flush=True)
                sys.stdin.read()
                lock.release()
            """),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout.readline().strip() == "running"
        self.pid = self.proc.pid

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: no release, run.lock and the running summary stay behind
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


@pytest.fixture
def holder():
    made: list[Holder] = []
    yield lambda folder: made.append(Holder(folder)) or made[-1]
    for h in made:
        h.close()


def _files(folder: RunFolder) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder.path)): p.read_bytes()
        for p in sorted(folder.path.rglob("*"))
        if p.is_file()
    }


def test_a_killed_sweep_run_is_interrupted_with_the_sweep_that_resumes_it(tmp_path, holder):
    root = tmp_path / "results"
    folder = _sweep_run(root)
    h = holder(folder)
    h.kill()
    before = _files(folder)
    assert json.loads(before["summary.json"])["status"] == "running" and "run.lock" in before

    col = collect(root)
    (run,) = col.runs
    assert run.status == "interrupted" and run.summary["status"] == "running"
    assert run.gone == f"its process {h.pid} on this machine no longer exists"
    assert resume_command(run) == (
        "sweep",
        f"creditaudit sweep main_audit --profile smoke results={root}",
    )

    text = inventory_markdown(col, root, generated="2026-01-01")
    assert "**1** (1 interrupted)" in text
    unfinished = text[text.index("## Skipped or unfinished") :]
    assert (
        f"- {folder.path}: interrupted (its process {h.pid} on this machine no longer exists): resume with "
        f"`creditaudit sweep main_audit --profile smoke results={root}` (finished runs are skipped)"
    ) in unfinished

    audit = build_audit(col)
    assert audit.not_finished == [run]
    page = html_page(audit, {})
    assert f"<code>creditaudit sweep main_audit --profile smoke results={root}</code>" in page

    assert (
        _files(folder) == before
    )  # reading never writes: the summary still says running, the lock stays


def test_the_sweep_command_keeps_where_the_data_is(tmp_path):
    root = tmp_path / "results"
    cfg = config.resolve_rule_options(
        config.apply_overrides(
            expand("main_audit", profile="smoke", results=str(root))[0],
            [f"data_dir={tmp_path / 'data'}"],
        )
    )
    folder = RunFolder(config.run_path(cfg))
    folder.write_config(config.to_dict(cfg))
    folder.write_summary({"status": "running"})
    (run,) = collect(root).runs
    assert resume_command(run) == (
        "sweep",
        f"creditaudit sweep main_audit --profile smoke results={root} "
        f"data.data_dir={tmp_path / 'data'}",
    )


def test_a_live_holder_keeps_its_run_running(tmp_path, holder):
    root = tmp_path / "results"
    folder = _sweep_run(root)
    h = holder(folder)
    (run,) = collect(root).runs
    assert run.status == "running" and run.gone == ""
    assert unfinished_note(run) == "status running; not in any table"
    text = inventory_markdown(collect(root), root, generated="2026-01-01")
    assert "**1** (1 running)" in text and f"{folder.path}: status running" in text
    h.proc.stdin.close()  # the holder releases its lock and ends
    assert h.proc.wait(timeout=60) == 0 and not folder.lock_path.exists()


def test_a_lock_from_another_machine_keeps_its_run_running_while_its_lease_lasts(tmp_path):
    root = tmp_path / "results"
    folder = _sweep_run(root)
    folder.write_summary({"status": "running"})
    # a dead pid, but on a host this one cannot look into: only the lease tells
    lock = {
        "pid": 2**22 + 12345,
        "host": "other",
        "scope": "other",
        "token": "t",
        "flock": True,
        "started": "2020-01-01T00:00:00+00:00",
        "lease_s": 300,
    }
    now = datetime.now(timezone.utc)
    folder.lock_path.write_text(
        json.dumps({**lock, "renewed": (now - timedelta(seconds=10)).isoformat()})
    )
    (run,) = collect(root).runs
    assert run.status == "running"
    folder.lock_path.write_text(
        json.dumps({**lock, "renewed": (now - timedelta(seconds=400)).isoformat()})
    )
    (run,) = collect(root).runs  # its node was lost: the lease ran out
    assert run.status == "interrupted" and run.gone.startswith(
        f"its process {lock['pid']} on another machine (host id other) has not renewed its lease for 4"
    )
    assert resume_command(run) == (
        "sweep",
        f"creditaudit sweep main_audit --profile smoke results={root}",
    )


def test_a_running_summary_without_a_lock_is_interrupted(tmp_path):
    root = tmp_path / "results"
    folder = _sweep_run(root)
    folder.write_summary({"status": "running"})  # e.g. a results folder copied without run.lock
    (run,) = collect(root).runs
    assert run.status == "interrupted" and "no run.lock" in run.gone
    assert not folder.lock_path.exists()


def test_a_run_not_from_a_sweep_is_resumed_by_creditaudit_train(tmp_path, holder):
    """Trained with `creditaudit train` (here: a setting of its own and options of its own), the
    command rebuilds its config exactly: same run folder, same fields that change results."""
    root = tmp_path / "results"
    cfg = config.resolve_rule_options(
        config.apply_overrides(
            config.TrainConfig(),
            [
                "rule=dfa",
                "arch=resmlp",
                "seed=7",
                "setting=mine",
                f"results={root}",
                "arch_label=resmlp-d64",
                "d=64",
                "L=3",
                "epochs=5",
                "lam=1e-3",
                "dataset=digits",
                "save_epochs=1,2",
                "residual=false",
                f"data_dir={tmp_path / 'data'}",
                "threads=1",
            ],
        )
    )
    folder = RunFolder(config.run_path(cfg))
    folder.write_config(config.to_dict(cfg))
    h = holder(folder)
    h.kill()
    (run,) = collect(root).runs
    how, command = resume_command(run)
    assert how == "train" and command.startswith(
        "creditaudit train rule=dfa arch=resmlp seed=7 setting=mine"
    )
    rebuilt = config.resolve_rule_options(
        config.apply_overrides(config.TrainConfig(), shlex.split(command)[2:])
    )
    assert config.run_path(rebuilt) == folder.path
    assert (
        typedconfig.diff(typedconfig.semantic_dict(rebuilt), typedconfig.semantic_dict(cfg)) == []
    )
    assert (rebuilt.data.data_dir, rebuilt.threads) == (
        str(tmp_path / "data"),
        1,
    )  # where its data is, kept
    note = unfinished_note(run)
    assert (
        note
        == f"interrupted (its process {h.pid} on this machine no longer exists): resume with `{command}`"
    )
