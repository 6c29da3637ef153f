"""`creditaudit sweep --stack N`: runs of one kind packed into stacks (jobs/packing.py), the
longest first, each run still in its own folder with the metrics it gives alone."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from creditaudit.cli import main
from creditaudit.config import run_path
from creditaudit.experiments import expand
from creditaudit.jobs.packing import job_cost, pack
from creditaudit.training.stack import stack_key
from tests.conftest import run_metrics, tiny_config
from tests.test_stack import assert_same_metrics


def _cfgs(tmp_path, rule, seeds, *extra):
    return [tiny_config(tmp_path, f"rule={rule}", f"seed={s}", *extra) for s in seeds]


def test_stacks_are_of_one_kind_near_equal_and_no_larger_than_asked(tmp_path):
    dfa = _cfgs(tmp_path, "dfa", range(20))
    ep = _cfgs(tmp_path, "ep", range(3))
    sb = _cfgs(tmp_path, "sb", range(2))  # sb cannot stack: one job per run
    wide = _cfgs(tmp_path, "dfa", range(2), "d=64")  # another kind
    jobs = pack(dfa + sb + ep + wide, 16)
    assert sorted(len(j) for j in jobs) == [1, 1, 2, 3, 10, 10]
    for job in jobs:
        assert len({stack_key(c) for c in job}) == 1
    assert [c.rule for j in jobs if len(j) == 1 for c in j] == ["sb", "sb"]
    costs = [job_cost(j) for j in jobs]
    assert costs == sorted(costs, reverse=True)  # longest first
    assert jobs[0][0].rule == "ep"  # 3 EP runs outweigh 10 DFA runs
    assert all(len(j) == 1 for j in pack(dfa + ep, 1))  # --stack 1: today's one run per job
    with pytest.raises(ValueError):
        pack(dfa, 0)


def test_the_sweep_refuses_a_stack_below_one(tmp_path):
    out = CliRunner().invoke(
        main, ["sweep", "no_residual", "--profile", "smoke", "--stack", "0", f"results={tmp_path}"]
    )
    assert out.exit_code == 2 and "--stack" in out.output and "Traceback" not in out.output


@pytest.mark.slow
def test_a_stacked_sweep_trains_every_run_as_it_trains_alone(tmp_path):
    """penalty_rescue (dfa, fa, sb, cb × 3 seeds; λ = 1e-2) at the smoke profile with --stack 3:
    dfa and fa runs in stacks of 3, sb and cb alone; every run finished, with the metrics of the
    same sweep with --stack 1."""
    runner = CliRunner()
    args = ["sweep", "penalty_rescue", "--profile", "smoke", "--workers", "2", "threads=1"]
    stacked = runner.invoke(
        main, [*args, "--stack", "3", f"results={tmp_path / 'stacked'}"], catch_exceptions=False
    )
    assert stacked.exit_code == 0, stacked.output
    alone = runner.invoke(
        main, [*args, "--stack", "1", f"results={tmp_path / 'alone'}"], catch_exceptions=False
    )
    assert alone.exit_code == 0, alone.output
    cfgs = {
        root: expand("penalty_rescue", profile="smoke", results=str(tmp_path / root))
        for root in ("stacked", "alone")
    }
    for a, b in zip(cfgs["alone"], cfgs["stacked"], strict=True):
        assert json.loads((run_path(b) / "summary.json").read_text())["status"] == "finished"
        records = run_metrics(b)
        stacks = b.rule in ("dfa", "fa")
        assert ("stack/runs" in records[-1]) == stacks, b.rule
        if stacks:
            assert records[-1]["stack/runs"] == 3
        assert_same_metrics(a, b)
    assert "0 failed" in stacked.output.strip().splitlines()[-1]
    again = runner.invoke(
        main,
        [*args, "--stack", "3", f"results={tmp_path / 'stacked'}", "--dry-run"],
        catch_exceptions=False,
    )
    assert "12 finished, 0 to train" in again.output
