"""The experiment registry and `creditaudit sweep` on the local backend."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from creditaudit.cli import main
from creditaudit.config import run_path
from creditaudit.experiments import PROFILES, SETTINGS, expand


@pytest.mark.parametrize("profile", list(PROFILES))
@pytest.mark.parametrize("name", SETTINGS.names())
def test_every_setting_expands_to_valid_distinct_runs(name, profile):
    cfgs = expand(name, profile=profile)
    assert len(cfgs) == SETTINGS.get(name).n_runs
    assert len({run_path(c) for c in cfgs}) == len(cfgs), "two runs of a setting share a folder"
    assert all(c.setting == name for c in cfgs)


def test_the_study_settings_and_their_run_counts():
    counts = {n: SETTINGS.get(n).n_runs for n in SETTINGS.names()}
    assert counts["main_audit"] == 18 and counts["cross_arch"] == 18 and counts["depth_sweep"] == 12
    assert counts["frozen_baselines"] == 12 and counts["early_checkpoints"] == 6 and counts["ep_6seeds"] == 6
    assert len(counts) == 17


def test_profiles_scale_epochs_and_data_never_definitions():
    paper, cpu = expand("depth_sweep", profile="paper"), expand("depth_sweep", profile="cpu")
    assert {c.epochs for c in paper} == {100} and {c.data.dataset for c in paper} == {"cifar10"}
    assert {c.epochs for c in cpu} == {6} and {c.data.train_subset for c in cpu} == {20000}
    assert sorted({(c.model.d, c.model.L) for c in cpu}) == [(512, L) for L in (2, 4, 6, 8, 12)]
    early = expand("early_checkpoints", profile="cpu")
    assert {c.epochs for c in early} == {5} and {c.save_epochs for c in early} == {(1, 2, 3, 4, 5)}
    assert {c.save_epochs for c in expand("early_checkpoints", profile="smoke")} == {(1, 2)}
    assert {c.model.residual for c in expand("no_residual")} == {False}
    assert {c.data.random_labels for c in expand("random_labels")} == {True}
    assert {c.lam for c in expand("penalty_rescue")} == {1e-2}


@pytest.mark.slow
def test_sweep_is_idempotent_and_isolates_a_failure(tmp_path, monkeypatch):
    runner = CliRunner()
    args = ["sweep", "no_terminal_ln", "penalty_1e-1", "--profile", "smoke", "--workers", "1",
            f"results={tmp_path}", "threads=1"]
    first = runner.invoke(main, args, catch_exceptions=False)
    assert first.exit_code == 0, first.output
    assert first.output.count("finished") >= 4
    cfgs = expand("no_terminal_ln", profile="smoke", results=str(tmp_path)) + expand("penalty_1e-1", profile="smoke", results=str(tmp_path))
    assert all(json.loads((run_path(c) / "summary.json").read_text())["status"] == "finished" for c in cfgs)
    stamp = {c.seed: (run_path(c) / "metrics.jsonl").stat().st_mtime_ns for c in cfgs}
    again = runner.invoke(main, [*args, "--dry-run"], catch_exceptions=False)
    assert f"{len(cfgs)} finished, 0 to train" in again.output
    runner.invoke(main, args, catch_exceptions=False)
    assert {c.seed: (run_path(c) / "metrics.jsonl").stat().st_mtime_ns for c in cfgs} == stamp  # nothing retrained

    # A run that crashes is recorded as failed and the others still train.
    import creditaudit.train.trainer as T

    real = T.train_epoch

    def flaky(run, *a, **k):
        if run.cfg.seed == 123:
            raise RuntimeError("simulated crash")
        return real(run, *a, **k)

    monkeypatch.setattr(T, "train_epoch", flaky)
    out = runner.invoke(main, ["sweep", "no_residual", "--profile", "smoke", "--workers", "1", f"results={tmp_path}"], catch_exceptions=False)
    assert "failed" in out.output and "simulated crash" in out.output
    statuses = {c.seed: json.loads((run_path(c) / "summary.json").read_text())["status"]
                for c in expand("no_residual", profile="smoke", results=str(tmp_path))}
    assert statuses == {42: "finished", 123: "failed", 456: "finished"}


@pytest.mark.slow
def test_two_sweeps_sharing_a_results_folder_train_each_run_once(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "creditaudit.cli", "sweep", "no_terminal_ln", "no_residual", "--profile", "smoke",
           "--workers", "1", f"results={tmp_path}", "threads=1", "epochs=3"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    cfgs = [c for n in ("no_terminal_ln", "no_residual") for c in expand(n, profile="smoke", results=str(tmp_path), overrides=("epochs=3",))]
    for c in cfgs:
        folder = run_path(c)
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["resumed_from"] is None
        epochs = [json.loads(line)["epoch"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert epochs == [0, 1, 2, 3], (folder, epochs)  # one training session wrote it, whole
        assert not (folder / "run.lock").exists() and not list(folder.glob(".*.partial"))
    # Each process reports every run once: trained (or found finished) by it, or locked by the other.
    for c in cfgs:
        label = f"{run_path(c).parent.name}/{run_path(c).name}"
        statuses = [line.split()[0] for o in outs for line in o.splitlines() if line.strip().endswith(label) or f" {label} " in line]
        assert len(statuses) == 2 and set(statuses) <= {"finished", "locked"} and "finished" in statuses, (label, statuses)
