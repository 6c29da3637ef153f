"""Run folders: names from the sweep axes, file layout, status from the summary, and a lock that
excludes a second owner (in this process or another), survives nothing of a dead owner, and is
released on exceptions."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from datetime import datetime, timezone
from pathlib import Path

import pytest

from creditaudit.runs import folder as fmod
from creditaudit.runs import lock as lmod
from creditaudit.runs.folder import (
    RUN_STATUSES,
    RunFolder,
    RunLock,
    RunLockedError,
    parse_run_name,
    run_dir,
    run_name,
)
from creditaudit.runs.io import CorruptRunError

SRC = str(Path(fmod.__file__).resolve().parents[2])  # the `src` folder, for child processes


# ---------------------------------------------------------------------------------------------
# names and layout
# ---------------------------------------------------------------------------------------------


def test_run_name_and_dir(tmp_path):
    assert run_name("dfa", "resmlp", 42) == "dfa__resmlp__s42"
    assert run_name("bp_frozen", "vit_mini", 0) == "bp_frozen__vit_mini__s0"
    assert (
        run_dir(tmp_path, "main_audit", "ep", "resmlp", 123)
        == tmp_path / "main_audit" / "ep__resmlp__s123"
    )
    assert parse_run_name("sb_shallow__resmlp__s456") == ("sb_shallow", "resmlp", 456)
    assert RunFolder.for_run(tmp_path, "x", "bp", "mlp", 1).path == tmp_path / "x" / "bp__mlp__s1"


@pytest.mark.parametrize(
    "rule, arch, seed, match",
    [
        ("", "resmlp", 1, "rule must not be empty"),
        ("dfa", "res/mlp", 1, "path separator"),
        ("dfa", "res\\mlp", 1, "path separator"),
        ("dfa__x", "resmlp", 1, "'__'"),
        ("dfa", "..", 1, "must not start with '.'"),
        ("dfa", "resmlp", -1, "non-negative int"),
        ("dfa", "resmlp", True, "non-negative int"),
        ("dfa", "resmlp", "42", "non-negative int"),
        (3, "resmlp", 1, "rule must be a str"),
    ],
)
def test_run_name_rejects_bad_components(rule, arch, seed, match):
    with pytest.raises(ValueError, match=match):
        run_name(rule, arch, seed)


def test_run_dir_validates_setting(tmp_path):
    assert run_dir(tmp_path, "penalty__1e-2", "dfa", "resmlp", 1).parent.name == "penalty__1e-2"
    for bad in ("", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="setting"):
            run_dir(tmp_path, bad, "dfa", "resmlp", 1)


@pytest.mark.parametrize(
    "name", ["dfa__resmlp", "dfa__resmlp__42", "dfa__resmlp__s042", "a__b__c__s1", "__resmlp__s1"]
)
def test_parse_run_name_rejects(name):
    with pytest.raises(ValueError, match="not a run name"):
        parse_run_name(name)


def test_run_folder_names_its_files_and_refuses_a_negative_epoch_checkpoint(tmp_path):
    f = RunFolder(tmp_path / "r")
    assert f.config_path == tmp_path / "r" / "config.json"
    assert f.metrics_path == tmp_path / "r" / "metrics.jsonl"
    assert f.summary_path == tmp_path / "r" / "summary.json"
    assert f.checkpoint_dir == tmp_path / "r" / "checkpoints"
    assert f.last_checkpoint == tmp_path / "r" / "checkpoints" / "last.safetensors"
    assert f.epoch_checkpoint(5) == tmp_path / "r" / "checkpoints" / "epoch_0005.safetensors"
    assert f.lock_path == tmp_path / "r" / "run.lock"
    with pytest.raises(ValueError):
        f.epoch_checkpoint(-1)


def test_epoch_checkpoints_lists_the_numbered_checkpoints_by_epoch_and_skips_other_files(tmp_path):
    f = RunFolder(tmp_path / "r")
    f.checkpoint_dir.mkdir(parents=True)
    for e in (12, 3):
        f.epoch_checkpoint(e).write_bytes(b"")
    (f.checkpoint_dir / "epoch_xx.safetensors").write_bytes(b"")
    assert f.epoch_checkpoints() == {3: f.epoch_checkpoint(3), 12: f.epoch_checkpoint(12)}


# ---------------------------------------------------------------------------------------------
# contents and status
# ---------------------------------------------------------------------------------------------


def test_status_transitions_and_files(tmp_path):
    f = RunFolder(tmp_path / "main" / "dfa__resmlp__s42")
    assert not f.exists()
    assert f.status() == "absent"
    assert f.read_config() is None and f.read_summary() is None and f.read_metrics() == []

    f.write_config({"rule": "dfa", "lr": 1e-3})
    assert f.read_config() == {"lr": 1e-3, "rule": "dfa"}
    for status in ("running", "interrupted", "running", "finished"):
        f.write_summary({"status": status, "test/acc": 0.5})
        assert f.status() == status
    assert set(RUN_STATUSES) == {"running", "finished", "failed", "diverged", "interrupted"}

    f.append_metrics({"epoch": 0, "train/loss": float("nan")})
    f.append_metrics({"epoch": 1, "train/loss": 1.0})
    assert f.read_metrics() == [{"epoch": 0, "train/loss": None}, {"epoch": 1, "train/loss": 1.0}]
    f.rewrite_metrics(f.read_metrics()[:1])
    assert [r["epoch"] for r in f.read_metrics()] == [0]


def test_write_summary_refuses_an_unknown_status(tmp_path):
    with pytest.raises(ValueError, match="status"):
        RunFolder(tmp_path).write_summary({"status": "done"})


def test_a_truncated_or_malformed_summary_raises_corrupt_run_error_saying_what_is_wrong(tmp_path):
    f = RunFolder(tmp_path)
    f.summary_path.write_text('{"status": "finished"')  # a non-atomic writer crashed
    with pytest.raises(CorruptRunError, match=r"summary.json.*not valid JSON"):
        f.status()
    f.summary_path.write_text('{"status": "weird"}')
    with pytest.raises(CorruptRunError, match="status 'weird'"):
        f.status()
    f.summary_path.write_text("[1]")
    with pytest.raises(CorruptRunError, match="not an object"):
        f.read_summary()


# ---------------------------------------------------------------------------------------------
# lock
# ---------------------------------------------------------------------------------------------


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # reaped: the pid no longer exists
    return p.pid


def _write_lock(f: RunFolder, **fields) -> None:
    host, scope = lmod._identity()
    info = {
        "pid": _dead_pid(),
        "host": host,
        "scope": scope,
        "token": "old",
        "flock": True,
        "started": "2020-01-01T00:00:00+00:00",
    }
    info.update(fields)
    f.path.mkdir(parents=True, exist_ok=True)
    f.lock_path.write_text(json.dumps(info))


def test_lock_is_exclusive_and_released(tmp_path):
    f = RunFolder(tmp_path / "run")
    with f.lock() as lk:
        assert lk.held and f.lock_path.exists()
        info = json.loads(f.lock_path.read_text())
        assert info["pid"] == os.getpid() and set(info) >= {"host", "scope", "started", "token"}
        with pytest.raises(RunLockedError, match=r"pid \d+ on this process") as err, f.lock():
            pass
        assert str(f.lock_path) in str(err.value)
        assert f.lock_path.exists()  # the failed attempt did not remove the holder's lock
    assert not f.lock_path.exists() and not lk.held
    with f.lock():  # free again
        pass


def test_lock_released_on_exception(tmp_path):
    f = RunFolder(tmp_path / "run")
    with pytest.raises(KeyError), f.lock():
        raise KeyError("training blew up")
    assert not f.lock_path.exists()
    lk = f.lock()
    lk.acquire()
    lk.release()
    lk.release()  # idempotent


def test_stale_lock_with_dead_pid_is_taken_over(tmp_path, capsys):
    f = RunFolder(tmp_path / "run")
    _write_lock(f)
    dead = json.loads(f.lock_path.read_text())["pid"]
    with f.lock():
        assert json.loads(f.lock_path.read_text())["pid"] == os.getpid()
    assert not f.lock_path.exists()
    err = capsys.readouterr().err
    # one plain line: the folder and the dead process, no warning's source path or code line
    assert err == (
        f"creditaudit: took over run folder {f.path}: its process {dead} on this machine "
        "no longer exists\n"
    )


def test_stale_lock_with_reused_pid_is_taken_over_via_flock(tmp_path, capsys):
    f = RunFolder(tmp_path / "run")
    _write_lock(f, pid=os.getpid())  # "alive" pid, but nobody holds the file's flock
    if lmod.fcntl is None:
        with pytest.raises(RunLockedError):
            f.lock().acquire()
        return
    with f.lock():
        pass
    err = capsys.readouterr().err
    assert (
        err.startswith(
            f"creditaudit: took over run folder {f.path}: its process {os.getpid()} "
            "on this machine no longer holds its flock"
        )
        and err.count("\n") == 1
    )


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"pid": 1, "flock": False}, "on this machine"),  # live pid, no flock to check
        ({"scope": "elsewhere"}, "this host, another container"),  # dead here, but other scope
        ({"host": "other", "scope": "other"}, "another machine"),
    ],
)
def test_lock_that_cannot_be_proved_stale_is_refused(tmp_path, fields, match):
    """Not provably stale, and its lease (which decides then: tests/test_lock_lease.py) is fresh."""
    f = RunFolder(tmp_path / "run")
    _write_lock(f, renewed=datetime.now(timezone.utc).isoformat(), lease_s=300, **fields)
    with pytest.raises(RunLockedError, match=match) as err:
        f.lock().acquire()
    assert f"delete {f.lock_path}" in str(err.value) and "its lease runs out at" in str(err.value)
    assert json.loads(f.lock_path.read_text())["token"] == "old"  # untouched


def test_unreadable_lock_and_stuck_takeover_are_refused(tmp_path):
    f = RunFolder(tmp_path / "run")
    f.path.mkdir()
    f.lock_path.write_text("")
    with pytest.raises(RunLockedError, match="no readable owner"):
        f.lock().acquire()
    _write_lock(f)
    (f.path / "run.lock.takeover").mkdir()
    with pytest.raises(RunLockedError, match=r"run.lock.takeover"):
        f.lock().acquire()


def test_lock_across_processes_and_after_a_crash(tmp_path, capsys):
    """A child holds the lock -> the parent is refused; the child is SIGKILLed -> taken over."""
    f = RunFolder(tmp_path / "run")
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys
            sys.path.insert(0, {SRC!r})
            from creditaudit.runs.lock import RunLock
            RunLock({str(f.lock_path)!r}).acquire()
            print("locked", flush=True)
            sys.stdin.read()  # hold until killed
        """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=rf"pid {child.pid} on this machine"):
            f.lock().acquire()
    finally:
        child.kill()  # SIGKILL: no release, the lock file stays behind
        child.wait()
        child.stdin.close()
        child.stdout.close()
    with f.lock():
        pass
    assert capsys.readouterr().err == (
        f"creditaudit: took over run folder {f.path}: its process "
        f"{child.pid} on this machine no longer exists\n"
    )


def test_lock_clears_partial_write_debris(tmp_path):
    f = RunFolder(tmp_path / "run")
    f.checkpoint_dir.mkdir(parents=True)
    (f.path / ".summary.json.0badc0de.partial").write_text("half")
    (f.checkpoint_dir / ".last.safetensors.0badc0de.partial").write_bytes(b"half")
    f.write_config({"a": 1})
    with f.lock():
        assert sorted(os.listdir(f.path)) == ["checkpoints", "config.json", "run.lock"]
        assert os.listdir(f.checkpoint_dir) == []


def test_release_leaves_a_replaced_lock_alone(tmp_path, capsys):
    f = RunFolder(tmp_path / "run")
    lk = RunLock(f.lock_path)
    lk.acquire()
    f.lock_path.unlink()
    f.lock_path.write_text(json.dumps({"pid": 1, "token": "someone else"}))
    lk.release()
    err = capsys.readouterr().err
    assert (
        err.startswith(f"creditaudit: left {f.lock_path} alone: it was removed or replaced")
        and err.count("\n") == 1
    )
    assert json.loads(f.lock_path.read_text())["token"] == "someone else"


def test_run_locked_error_reduces(tmp_path):
    err = RunLockedError(tmp_path / "run.lock", "held by pid 1")
    back = copy.deepcopy(err)  # the __reduce__ protocol Ray's pickling uses
    assert str(back) == str(err) and back.lock_path == err.lock_path
