"""The lease on a run folder's lock: a lock left by another machine, container or boot (a lost Ray
node, a killed container) is taken over once its holder has stopped renewing it for a lease, and
refused before; the holder renews its own, stops on release, and never writes over a lock that is
no longer its own. Leases here are a fraction of a second ($CREDITAUDIT_LOCK_LEASE_S)."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from creditaudit.runs import lock as lmod
from creditaudit.runs.folder import RunFolder, RunLock, RunLockedError, run_dir
from creditaudit.runs.lock import lock_state
from creditaudit.training.trainer import train
from tests.conftest import tiny_config

LEASE_ENV = "CREDITAUDIT_LOCK_LEASE_S"
FOREIGN_PID = 2**22 + 12345  # a pid on a machine this one cannot look into


def _ago(seconds: float) -> str:
    return (datetime.now(timezone.utc) - timedelta(seconds=seconds)).isoformat()


def _foreign_lock(
    f: RunFolder, *, renewed_ago: float | None, lease_s: float = 300, **fields
) -> str:
    """Write the lock of a process on another machine, last renewed ``renewed_ago`` seconds ago
    (None: a lock from before leases, with ``started`` only). Returns the file's text."""
    info = {
        "pid": FOREIGN_PID,
        "host": "other",
        "scope": "other",
        "token": "theirs",
        "flock": True,
        "started": "2020-01-01T00:00:00+00:00",
    }
    if renewed_ago is not None:
        info.update(renewed=_ago(renewed_ago), lease_s=lease_s)
    info.update(fields)
    f.path.mkdir(parents=True, exist_ok=True)
    text = json.dumps({k: v for k, v in info.items() if v is not None})
    f.lock_path.write_text(text)
    return text


def _renewed(f: RunFolder) -> datetime:
    return datetime.fromisoformat(json.loads(f.lock_path.read_text())["renewed"])


def _wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------
# A lock from another machine
# ---------------------------------------------------------------------------------------------


def test_a_lost_nodes_lock_is_taken_over_and_its_run_trained(tmp_path, capsys):
    cfg = tiny_config(tmp_path, "epochs=2")
    train(cfg, stop_after=1)
    folder = RunFolder(run_dir(cfg.results, cfg.setting, cfg.rule, cfg.arch, cfg.seed))
    # Its node was lost one epoch in: a running summary, and the node's lock, unrenewed for 400 s
    # (what Ray's retry on another node finds).
    folder.write_summary({**folder.read_summary(), "status": "running"})
    _foreign_lock(folder, renewed_ago=400)
    capsys.readouterr()
    summary = train(cfg)
    assert (
        summary["status"] == "finished"
        and summary["epochs_done"] == 2
        and summary["resumed_from"] == 1
    )
    assert not folder.lock_path.exists()
    err = capsys.readouterr().err
    assert re.fullmatch(
        rf"creditaudit: took over run folder {re.escape(str(folder.path))}: its process "
        rf"{FOREIGN_PID} on another machine \(host id other\) has not renewed its lease for "
        r"40\d s \(lease 300 s\)\n",
        err,
    ), err


@pytest.mark.parametrize(
    "renewed_ago, lease_s, left",
    [
        (100, 300, r"2\d\d"),  # renewed 100 s ago: 200 s left
        (400, 3600, r"3\d\d\d"),  # its holder's own lease counts, not this process's 300 s
    ],
)
def test_a_foreign_lock_with_a_fresh_lease_is_refused_until_it_runs_out(
    tmp_path, renewed_ago, lease_s, left
):
    f = RunFolder(tmp_path / "run")
    text = _foreign_lock(f, renewed_ago=renewed_ago, lease_s=lease_s)
    with pytest.raises(
        RunLockedError,
        match=rf"pid {FOREIGN_PID} on another machine \(host id other\) since "
        rf".*; its lease runs out at .* UTC \(in {left} s\)",
    ) as err:
        f.lock().acquire()
    assert f"delete {f.lock_path}" in str(err.value)
    assert f.lock_path.read_text() == text  # untouched


def test_a_lock_from_another_container_takes_the_same_lease(tmp_path, capsys):
    f = RunFolder(tmp_path / "run")
    host, _ = lmod._identity()
    _foreign_lock(f, renewed_ago=100, host=host)
    with pytest.raises(RunLockedError, match="this host, another container or boot"):
        f.lock().acquire()
    _foreign_lock(f, renewed_ago=301, host=host)
    with f.lock():
        pass
    assert re.fullmatch(
        rf"creditaudit: took over run folder .*: its process {FOREIGN_PID} on this host, another "
        r"container or boot has not renewed its lease for 30\d s \(lease 300 s\)\n",
        capsys.readouterr().err,
    )


def test_a_lock_from_before_leases_counts_from_its_start(tmp_path, capsys):
    f = RunFolder(tmp_path / "run")
    _foreign_lock(f, renewed_ago=None, started=_ago(100))
    with pytest.raises(RunLockedError, match=r"its lease runs out at .* \(in 2\d\d s\)"):
        f.lock().acquire()
    _foreign_lock(
        f, renewed_ago=None, started=None
    )  # no time at all: never taken over automatically
    with pytest.raises(RunLockedError, match="with no time of renewal"):
        f.lock().acquire()
    _foreign_lock(f, renewed_ago=None, started=_ago(400))
    with f.lock():
        pass
    err = capsys.readouterr().err
    assert (
        err.endswith(
            "has not renewed its lease for 400 s (lease 300 s, counted from its start: a lock from "
            "before leases)\n"
        )
        and err.count("\n") == 1
    )


def test_lock_state_judges_a_foreign_lock_by_its_lease(tmp_path, capsys):
    f = RunFolder(tmp_path / "run")
    _foreign_lock(f, renewed_ago=100)
    state = lock_state(f.lock_path)
    assert state.owned and state.exists and "its lease runs out at" in state.detail
    _foreign_lock(f, renewed_ago=400)
    state = lock_state(f.lock_path)
    assert not state.owned and state.exists
    assert re.fullmatch(
        rf"its process {FOREIGN_PID} on another machine \(host id other\) has not renewed its "
        r"lease for 40\d s \(lease 300 s\)",
        state.detail,
    )
    assert json.loads(f.lock_path.read_text())["token"] == "theirs"  # looking takes nothing
    with f.lock():  # and taking agrees, saying the same
        pass
    assert capsys.readouterr().err.endswith(f": {state.detail}\n")


@pytest.mark.skipif(lmod.fcntl is None, reason="no flock to prove the holder alive")
def test_a_held_flock_outweighs_an_expired_lease(tmp_path):
    f = RunFolder(tmp_path / "run")
    _foreign_lock(f, renewed_ago=400, pid=os.getpid(), scope=lmod._identity()[1])
    fd = os.open(f.lock_path, os.O_RDONLY)
    try:
        lmod.fcntl.flock(fd, lmod.fcntl.LOCK_EX)  # its holder lives, stuck past its lease
        with pytest.raises(RunLockedError, match="held by pid"):
            f.lock().acquire()
        assert lock_state(f.lock_path).owned
    finally:
        os.close(fd)


def test_a_bad_lease_setting_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv(LEASE_ENV, "5min")
    with pytest.raises(ValueError, match=rf"\${LEASE_ENV}='5min' is not a number of seconds"):
        RunFolder(tmp_path / "run").lock()


# ---------------------------------------------------------------------------------------------
# The holder's renewal
# ---------------------------------------------------------------------------------------------


def test_the_holder_renews_its_lease_while_it_holds_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv(LEASE_ENV, "0.6")  # renewed every 0.06 s
    f = RunFolder(tmp_path / "run")
    with f.lock():
        first = json.loads(f.lock_path.read_text())
        assert first["lease_s"] == 0.6 and first["renewed"]
        # Seen from another machine, it stays owned for 2.5 leases: the renewals keep it fresh.
        monkeypatch.setattr(lmod, "_identity", lambda: ("elsewhere", "elsewhere"))
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            assert lock_state(f.lock_path).owned
            time.sleep(0.05)
        with pytest.raises(RunLockedError, match=r"another machine .*its lease runs out at"):
            f.lock().acquire()
        last = json.loads(f.lock_path.read_text())
    assert last["token"] == first["token"] and len(last["renewed"]) == len(first["renewed"])
    assert datetime.fromisoformat(last["renewed"]) - datetime.fromisoformat(
        first["renewed"]
    ) > timedelta(seconds=1)


def test_renewal_stops_on_release(tmp_path, monkeypatch):
    monkeypatch.setenv(LEASE_ENV, "0.2")
    f = RunFolder(tmp_path / "run")
    lk = f.lock()
    lk.acquire()
    first = _renewed(f)
    _wait_for(lambda: _renewed(f) > first)
    lk.release()
    assert not f.lock_path.exists()
    assert not [t for t in threading.enumerate() if t.name.startswith("creditaudit lease")]
    text = _foreign_lock(f, renewed_ago=0, token="next")  # the next owner's
    time.sleep(0.2)  # ten renewal intervals
    assert f.lock_path.read_text() == text


@pytest.mark.parametrize("how", ["removed", "replaced", "rewritten in place"])
def test_a_holder_that_lost_its_lock_notices_and_never_writes_over_it(
    tmp_path, monkeypatch, capsys, how
):
    monkeypatch.setenv(LEASE_ENV, "0.2")
    f = RunFolder(tmp_path / "run")
    lk = f.lock()
    lk.acquire()
    if how in ("removed", "replaced"):
        f.lock_path.unlink()
    text = None
    if how != "removed":  # "rewritten in place": the holder's descriptor still opens this very file
        text = _foreign_lock(f, renewed_ago=0, token="theirs")
    _wait_for(lambda: lk.lost is not None)
    time.sleep(0.1)
    assert (f.lock_path.read_text() if f.lock_path.exists() else None) == text
    assert lk.held and "removed or replaced by another process" in lk.lost
    lk.release()
    assert (f.lock_path.read_text() if f.lock_path.exists() else None) == text
    err = capsys.readouterr().err
    assert (
        err.startswith(
            f"creditaudit: lost run folder {f.path}: its run.lock was removed or replaced"
        )
        and err.count("\n") == 1
    ), err


def test_a_failed_renewal_is_tried_again_not_raised(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(LEASE_ENV, "0.2")
    f = RunFolder(tmp_path / "run")
    failures = [OSError("the file server went away")] * 3
    rewrite = lmod._rewrite

    def flaky(fd, info):
        if failures:
            raise failures.pop()
        rewrite(fd, info)

    with RunLock(f.lock_path) as lk:
        first = _renewed(f)
        monkeypatch.setattr(lmod, "_rewrite", flaky)
        _wait_for(lambda: _renewed(f) > first)
        assert lk.lost is None and not failures
    assert not f.lock_path.exists()
    assert capsys.readouterr().err == (
        f"creditaudit: could not renew the lease on {f.lock_path} (OSError: the file "
        "server went away); trying again every 0.02 s\n"
    )


def test_a_ray_retry_waits_for_a_lost_nodes_lease_and_resumes_the_run(tmp_path):
    """After a lost node, Ray's retry (on another node) finds the dead node's lock with its lease
    still running: the task waits for it to run out, takes the run over and resumes it. A holder
    that keeps renewing is reported locked after that wait."""
    from creditaudit.config import to_dict
    from creditaudit.jobs import ray_backend

    cfg = tiny_config(tmp_path, "epochs=2")
    train(cfg, stop_after=1)
    folder = RunFolder(run_dir(cfg.results, cfg.setting, cfg.rule, cfg.arch, cfg.seed))
    folder.write_summary({**folder.read_summary(), "status": "running"})
    _foreign_lock(folder, renewed_ago=0, lease_s=1.5)  # the lost node renewed it just now
    t0 = time.monotonic()
    (outcome,) = ray_backend._train_job_on_a_cluster([to_dict(cfg)], False, 1)
    assert outcome.status == "finished" and time.monotonic() - t0 >= 1.5
    assert folder.read_summary()["resumed_from"] == 1

    other = tiny_config(tmp_path, "epochs=2", "seed=7")
    held = RunFolder(run_dir(other.results, other.setting, other.rule, other.arch, other.seed))
    _foreign_lock(held, renewed_ago=0, lease_s=1.0)
    stop = threading.Event()

    def renew() -> None:  # a live holder on another node keeps its lease fresh
        while not stop.is_set():
            _foreign_lock(held, renewed_ago=0, lease_s=1.0)
            time.sleep(0.1)

    renewer = threading.Thread(target=renew)
    renewer.start()
    try:
        (outcome,) = ray_backend._train_job_on_a_cluster([to_dict(other)], False, 1)
    finally:
        stop.set()
        renewer.join()
    assert outcome.status == "locked"


def test_a_run_whose_lock_was_taken_over_stops_writing(tmp_path, monkeypatch):
    """A holder cut off for longer than its lease (paused, partitioned) finds its lock taken over:
    it stops at the end of the epoch, writing nothing more into the folder (metrics, summary,
    checkpoint), and leaves the new holder's lock alone."""
    from creditaudit.runs.lock import RunLockLost
    from creditaudit.training.trainer import Reporter

    monkeypatch.setenv(LEASE_ENV, "0.3")  # renewed every 0.03 s
    cfg = tiny_config(tmp_path, "epochs=3")
    folder = RunFolder(run_dir(cfg.results, cfg.setting, cfg.rule, cfg.arch, cfg.seed))
    taken: list[str] = []

    def on_epoch(run, record) -> None:
        if record["epoch"] == 1:  # another process takes the run over
            taken.append(_foreign_lock(folder, renewed_ago=0))
            time.sleep(0.2)

    with pytest.raises(RunLockLost, match="no longer holds its lock"):
        train(cfg, reporter=Reporter(on_epoch=on_epoch))
    assert [r["epoch"] for r in folder.read_metrics()] == [0, 1]
    assert folder.read_summary()["status"] == "running"
    assert folder.lock_path.read_text() == taken[0]
