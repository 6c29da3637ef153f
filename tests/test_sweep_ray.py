"""`creditaudit sweep --backend ray` against a local Ray cluster: one job (a run, or a stack of
runs) per task, the results folder as the meeting point, failures isolated, nothing trained twice."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from creditaudit.cli import main
from creditaudit.config import run_path
from creditaudit.experiments import expand
from creditaudit.jobs.ray_backend import portable, run_many_ray
from tests.conftest import tiny_config

# A rule whose every step crashes: the run it trains must fail alone.
BROKEN_RULE = """
from creditaudit.rules import RULES
from creditaudit.rules.bp import BP


@RULES.register("broken_for_ray", "crashes on its first step (a test plugin)")
class Broken(BP):
    def credits(self, model, x, y, fwd):
        raise RuntimeError("simulated crash in a Ray task")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_env(monkeypatch):
    """Ray's documented test settings; its socket paths must stay short, so the temp dir is under
    the system temp folder (removed after) rather than pytest's deep tmp_path."""
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with tempfile.TemporaryDirectory(prefix="ray") as tmp:
        yield tmp


@pytest.fixture
def ray_cluster(ray_env):
    """A separate local Ray head node, as `ray start --head` makes one; stopped after."""
    port = _free_port()
    ray_bin = Path(sys.executable).with_name("ray")
    start = [
        str(ray_bin),
        "start",
        "--head",
        f"--port={port}",
        "--num-cpus=2",
        "--include-dashboard=false",
        f"--temp-dir={ray_env}",
        "--disable-usage-stats",
    ]
    subprocess.run(start, check=True, capture_output=True, text=True, timeout=180)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], capture_output=True, timeout=120)


def test_portable_configs_carry_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tmp_path, "results=rel/results", "data_dir=rel/data")
    out = portable(cfg)
    assert out.results == str(tmp_path / "rel/results") and out.data.data_dir == str(
        tmp_path / "rel/data"
    )
    assert cfg.results == "rel/results"  # the caller's config is left alone


def test_ray_backend_without_ray_names_the_fix(tmp_path, monkeypatch):
    import builtins

    from creditaudit.errors import ConfigError

    real = builtins.__import__

    def no_ray(name, *a, **k):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(ConfigError, match=r"creditaudit\[ray\]"):
        run_many_ray([tiny_config(tmp_path)])


@pytest.mark.slow
def test_ray_backend_trains_each_run_once_and_isolates_a_failure(tmp_path, ray_env):
    results = tmp_path / "results"
    cfgs = expand("no_terminal_ln", profile="smoke", results=str(results), overrides=("threads=1",))
    broken_file = tmp_path / "broken_rule.py"
    broken_file.write_text(BROKEN_RULE)
    broken = tiny_config(tmp_path, f"rule={broken_file}", f"results={results}", "setting=broken")

    outcomes = run_many_ray([*cfgs, broken], num_cpus=2, temp_dir=ray_env)
    by_run = {o.run: o for o in outcomes}
    assert len(by_run) == 4
    for c in cfgs:
        summary = json.loads((run_path(c) / "summary.json").read_text())
        assert (
            summary["status"] == "finished"
            and by_run[f"no_terminal_ln/{run_path(c).name}"].status == "finished"
        )
    failed = by_run[f"broken/{run_path(broken).name}"]
    assert failed.status == "failed" and "simulated crash in a Ray task" in failed.error
    assert json.loads((run_path(broken) / "summary.json").read_text())["status"] == "failed"

    stamps = {c.seed: (run_path(c) / "metrics.jsonl").stat().st_mtime_ns for c in cfgs}
    again = run_many_ray(cfgs, num_cpus=2, temp_dir=ray_env)
    assert {o.status for o in again} == {"finished"}
    assert {
        c.seed: (run_path(c) / "metrics.jsonl").stat().st_mtime_ns for c in cfgs
    } == stamps  # nothing retrained


@pytest.mark.slow
def test_sweep_cli_on_an_existing_ray_cluster(tmp_path, ray_cluster):
    """Three runs of one kind with --stack 2: a task trains a stack of two, another the third."""
    results = tmp_path / "results"
    args = [
        "sweep",
        "no_residual",
        "--profile",
        "smoke",
        "--backend",
        "ray",
        "--address",
        ray_cluster,
        "--stack",
        "2",
        f"results={results}",
    ]
    out = CliRunner().invoke(main, args, catch_exceptions=False)
    assert out.exit_code == 0, out.output
    cfgs = expand("no_residual", profile="smoke", results=str(results))
    assert all(
        json.loads((run_path(c) / "summary.json").read_text())["status"] == "finished" for c in cfgs
    )
    stacks = sorted(
        json.loads((run_path(c) / "metrics.jsonl").read_text().splitlines()[-1]).get(
            "stack/runs", 1
        )
        for c in cfgs
    )
    assert stacks == [1, 2, 2]
    reported = [
        line.split() for line in out.output.splitlines() if line.strip().startswith("finished")
    ]
    assert sorted(r[1] for r in reported) == sorted(f"no_residual/{run_path(c).name}" for c in cfgs)
    dry = CliRunner().invoke(main, [*args, "--dry-run"], catch_exceptions=False)
    assert f"{len(cfgs)} finished, 0 to train" in dry.output


def test_sweep_cli_names_an_unreachable_cluster(tmp_path, ray_env):
    port = _free_port()  # nothing listens there
    out = CliRunner().invoke(
        main,
        [
            "sweep",
            "no_residual",
            "--profile",
            "smoke",
            "--backend",
            "ray",
            "--address",
            f"127.0.0.1:{port}",
            f"results={tmp_path}",
        ],
    )
    assert out.exit_code == 2, out.output
    assert "could not connect to the Ray cluster" in out.output
