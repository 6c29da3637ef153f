"""One progress line for a whole job: runs finished / total, failed, elapsed, ETA from the epochs
trained so far; plain lines with the same counts when the output is piped."""

from __future__ import annotations

import json

from click.testing import CliRunner

from creditaudit.cli import main
from creditaudit.jobs.progress import JobProgress, clock


def test_eta_counts_only_the_epochs_trained_in_this_job():
    t = [100.0]
    job = JobProgress(
        {"s/a": 10, "s/b": 10, "s/c": 20, "s/d": 5}, already={"s/d"}, now=lambda: t[0]
    )
    assert job.eta_s() is None and job.state() == "0 failed · ETA –"
    job.update("s/d", "finished")  # found finished: no time spent, no epochs in the rate
    t[0] = 160.0
    job.update("s/a", "finished")  # 10 epochs in 60 s: 6 s an epoch, 30 epochs left
    assert job.eta_s() == 180.0
    job.update("s/b", "failed")
    assert job.failed == 1 and job.done == 3 and job.eta_s() == 20 * 60 / 20
    assert job.line() == "3/4 runs, 1 failed · ETA 1:00, 1:00 elapsed"
    assert clock(3725) == "1:02:05"


def test_a_piped_sweep_prints_the_counts_with_every_run(tmp_path):
    res = CliRunner().invoke(
        main,
        [
            "sweep",
            "no_terminal_ln",
            "--profile",
            "smoke",
            "--workers",
            "1",
            f"results={tmp_path}",
            "threads=1",
        ],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    lines = [
        line for line in res.output.splitlines() if "finished" in line and "no_terminal_ln/" in line
    ]
    assert len(lines) == 3
    assert "[1/3 runs, 0 failed · ETA" in lines[0] and "[3/3 runs, 0 failed · ETA 0:00" in lines[2]
    assert res.output.strip().splitlines()[-1].startswith("3/3 runs, 0 failed")
    assert (
        json.loads(
            (tmp_path / "no_terminal_ln" / "dfa__resmlp-noLN__s42" / "summary.json").read_text()
        )["status"]
        == "finished"
    )
