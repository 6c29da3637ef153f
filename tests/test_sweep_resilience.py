"""A sweep outlives its workers: a worker process that dies costs its own job only.

The pool (``jobs/processes.py``) replaces a dead worker, starts the dead one's job again once (its
runs resume from their checkpoints) and gives it up when it dies again; the other jobs never notice.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from creditaudit.jobs.processes import in_processes, worker_death


def _job(kind: str, marker: str, threads: int) -> str:
    """A job: ``ok`` returns; ``once`` kills its worker the first time (a marker file remembers);
    ``always`` kills it every time; ``exit`` leaves with status 3."""
    if kind == "once" and not os.path.exists(marker):
        Path(marker).write_text("started")
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "always":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "exit":
        os._exit(3)
    return f"{kind} done in pid {os.getpid()} with {threads} thread(s)"


def test_a_dead_worker_costs_its_own_job_only(tmp_path):
    said: list[str] = []
    jobs = [
        ("ok", ""),
        ("once", str(tmp_path / "m1")),
        ("ok", ""),
        ("always", ""),
        ("ok", ""),
        ("exit", ""),
        ("ok", ""),
    ]
    results = list(
        in_processes(
            _job,
            jobs,
            workers=2,
            lost=lambda job, why: f"lost {job[0]}: {why}",
            name=lambda job: f"job {job[0]}",
            say=said.append,
        )
    )
    assert len(results) == len(jobs)
    assert sorted(r.split(" ")[0] for r in results if not r.startswith("lost")) == [
        "ok",
        "ok",
        "ok",
        "ok",
        "once",
    ]
    assert all("with 1 thread(s)" in r for r in results if not r.startswith("lost"))
    lost = sorted(r for r in results if r.startswith("lost"))
    assert lost == [
        "lost always: its worker was killed by SIGKILL (out of memory?), 2 times",
        "lost exit: its worker exited with status 3, 2 times",
    ]
    # each death told in one line, naming the job: once (retried), always and exit (retried, given up)
    deaths = [line for line in said if ": its worker (pid " in line]
    assert len(deaths) == 5 and all("\n" not in line for line in deaths)
    assert sorted(line.split(":")[0] for line in deaths if "starting it again" in line) == [
        "job always",
        "job exit",
        "job once",
    ]
    assert sorted(line.split(":")[0] for line in deaths if line.endswith("again; given up")) == [
        "job always",
        "job exit",
    ]


def _chatty(text: str, threads: int) -> str:
    print(text, file=sys.stderr)
    return text


def test_what_a_worker_writes_to_stderr_is_said_by_the_parent():
    """Workers' stderr lines reach ``say`` (the sweep prints them above its progress bar) instead of
    being written through the live display."""
    said: list[str] = []
    results = list(
        in_processes(
            _chatty, [("one",), ("two",)], workers=2, lost=lambda job, why: why, say=said.append
        )
    )
    assert sorted(results) == ["one", "two"] and sorted(said) == ["one", "two"]


def test_worker_death_in_words():
    assert worker_death(-signal.SIGKILL) == "was killed by SIGKILL (out of memory?)"
    assert worker_death(-signal.SIGTERM) == "was killed by SIGTERM"
    assert worker_death(1) == "exited with status 1"


# ---------------------------------------------------------------------------------------------
# The real sweep: a worker killed mid-run, and the exit statuses
# ---------------------------------------------------------------------------------------------
import json  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

from creditaudit.runs.folder import RunFolder  # noqa: E402

CLI = [sys.executable, "-c", "from creditaudit.cli import main; main()"]


def _sweep(results: Path, *args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [
            *CLI,
            "sweep",
            "no_terminal_ln",
            "--profile",
            "smoke",
            f"results={results}",
            "threads=1",
            *args,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def _runs(results: Path) -> list[RunFolder]:
    return [RunFolder(p) for p in sorted((results / "no_terminal_ln").iterdir())]


@pytest.mark.slow
def test_a_sweep_whose_worker_is_killed_finishes_every_run(tmp_path):
    """The issue's own case: two workers, one run's worker killed (SIGKILL) mid-epoch. The run is
    started again in a fresh worker and resumes; every run finishes, each epoch logged once; the
    sweep says what happened and exits 0."""
    results = tmp_path / "r"
    sweep = _sweep(results, "--workers", "2", "epochs=25")
    victim = None
    deadline = time.monotonic() + 240
    while victim is None and time.monotonic() < deadline and sweep.poll() is None:
        for folder in _runs(results) if (results / "no_terminal_ln").is_dir() else []:
            try:
                pid = json.loads(folder.lock_path.read_text())["pid"]
            except (OSError, ValueError, KeyError):
                continue
            if len(folder.read_metrics()) >= 3:  # the run is under way, with a checkpoint behind it
                os.kill(pid, signal.SIGKILL)
                victim = folder
                break
        time.sleep(0.05)
    out, _ = sweep.communicate(timeout=600)
    assert victim is not None, out
    assert sweep.returncode == 0, out
    assert (
        f"{victim.path.parent.name}/{victim.path.name}: its worker (pid" in out
        and "killed by SIGKILL" in out
    ), out
    assert "starting it again, from its checkpoint" in out, out
    assert out.strip().splitlines()[-1].startswith("3/3 runs, 0 failed, 1 worker(s) died"), out
    for folder in _runs(results):
        assert folder.read_summary()["status"] == "finished", folder.path
        assert [r["epoch"] for r in folder.read_metrics()] == list(range(0, 26)), folder.path
    assert victim.read_summary().get("resumed_from"), "the killed run resumed from its checkpoint"


def test_a_sweep_whose_runs_all_diverge_exits_1(tmp_path):
    res = subprocess.run(
        [
            *CLI,
            "sweep",
            "no_terminal_ln",
            "--profile",
            "smoke",
            "--workers",
            "1",
            f"results={tmp_path}",
            "threads=1",
            "lr=1e3",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.stdout.strip().splitlines()[-1].startswith("3/3 runs, 3 failed"), res.stdout


def test_a_sweep_whose_run_another_process_holds_exits_3_and_counts_it_as_held(tmp_path):
    """A run whose folder another live process has locked is not a failure: the others finish, the
    end line says one is held, and the exit status is 3."""
    from creditaudit.config import run_path
    from creditaudit.experiments import expand

    cfg = expand("no_terminal_ln", profile="smoke", overrides=(f"results={tmp_path}",))[0]
    folder = run_path(cfg)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom creditaudit.runs.folder import RunFolder\n"
            "folder = RunFolder(sys.argv[1]); folder.path.mkdir(parents=True, exist_ok=True)\n"
            "with folder.lock():\n    print('held', flush=True); time.sleep(120)",
            str(folder),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        res = subprocess.run(
            [
                *CLI,
                "sweep",
                "no_terminal_ln",
                "--profile",
                "smoke",
                "--workers",
                "1",
                f"results={tmp_path}",
                "threads=1",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        holder.kill()
        holder.wait()
    assert res.returncode == 3, res.stdout + res.stderr
    assert (
        res.stdout.strip()
        .splitlines()[-1]
        .startswith("3/3 runs, 0 failed, 1 held by another process")
    ), res.stdout


def test_an_interrupted_sweep_says_so_in_one_line_and_exits_130(tmp_path):
    sweep = _sweep(tmp_path, "--workers", "1", "epochs=200")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(
        f.read_metrics()
        for f in (_runs(tmp_path) if (tmp_path / "no_terminal_ln").is_dir() else [])
    ):
        time.sleep(0.05)
    sweep.send_signal(signal.SIGINT)
    out, _ = sweep.communicate(timeout=120)
    assert sweep.returncode == 130, out
    assert "Traceback" not in out and out.strip().splitlines()[-1].startswith("interrupted: "), out


def test_a_usage_error_exits_2(tmp_path):
    res = subprocess.run(
        [*CLI, "sweep", "no_terminal_ln", "--stack", "0", f"results={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "--stack" in res.stderr and "Traceback" not in res.stderr


def _lock_pids(results: Path, n: int, deadline: float) -> list[int]:
    """The pids of the processes training the sweep's runs, once ``n`` of them are under way."""
    while time.monotonic() < deadline:
        pids = []
        for folder in _runs(results) if (results / "no_terminal_ln").is_dir() else []:
            try:
                pid = json.loads(folder.lock_path.read_text())["pid"]
            except (OSError, ValueError, KeyError):
                continue
            if folder.read_metrics():
                pids.append(pid)
        if len(pids) >= n:
            return pids
        time.sleep(0.05)
    raise AssertionError(f"fewer than {n} runs got under way")


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.slow
def test_a_sweep_sent_sigterm_stops_its_workers_runs_as_ctrl_c_does(tmp_path):
    """`kill PID` on the sweep alone (not its process group): it stops as on Ctrl-C — exit 130, one
    line — and its workers stop their runs too, which record themselves interrupted and free their
    folders, so that the same command resumes them."""
    sweep = _sweep(tmp_path, "--workers", "2", "epochs=400")
    workers = _lock_pids(tmp_path, 2, time.monotonic() + 240)
    sweep.send_signal(signal.SIGTERM)
    out, _ = sweep.communicate(timeout=120)
    assert sweep.returncode == 130, out
    assert "Traceback" not in out and out.strip().splitlines()[-1].startswith("interrupted: "), out
    assert all(_gone(pid, 30) for pid in workers), out
    stopped = [f for f in _runs(tmp_path) if f.read_metrics()]
    assert len(stopped) >= 2
    for folder in stopped:
        assert folder.read_summary()["status"] == "interrupted", folder.path
        assert not folder.lock_path.exists(), folder.path


@pytest.mark.slow
def test_the_workers_of_a_sweep_killed_outright_stop_their_runs(tmp_path):
    """SIGKILL leaves the sweep no time to stop anything: its orphaned workers notice and stop their
    runs themselves (recorded interrupted, folders freed) instead of training on for no one."""
    sweep = _sweep(tmp_path, "--workers", "2", "epochs=400")
    workers = _lock_pids(tmp_path, 2, time.monotonic() + 240)
    sweep.kill()
    sweep.communicate(timeout=60)
    assert all(_gone(pid, 30) for pid in workers)
    for folder in _runs(tmp_path):
        if folder.read_metrics():
            assert folder.read_summary()["status"] == "interrupted", folder.path
            assert not folder.lock_path.exists(), folder.path
