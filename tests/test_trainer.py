"""The trainer in its run folder: metrics, skip, resume (in process and after SIGKILL), failures."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from creditaudit.config import resolve_rule_options, to_dict
from creditaudit.runs.checkpoint import load_checkpoint
from creditaudit.runs.folder import RunConfigMismatch, RunFolder, run_dir
from creditaudit.training.run import build_run
from creditaudit.training.trainer import train
from tests.conftest import run_metrics, tiny_config


def _folder(cfg) -> RunFolder:
    return RunFolder(run_dir(cfg.results, cfg.setting, cfg.rule, cfg.arch, cfg.seed))


def _weights(cfg) -> dict:
    state, _ = load_checkpoint(_folder(cfg).last_checkpoint)
    return state["model"]


def test_run_folder_contents(tmp_path):
    cfg = tiny_config(tmp_path)
    summary = train(cfg)
    folder = _folder(cfg)
    assert folder.path == tmp_path / "results" / "adhoc" / "bp__resmlp__s42"
    assert summary["status"] == "finished" and summary["epochs_done"] == 2
    stored = json.loads((folder.path / "config.json").read_text())
    assert stored == to_dict(resolve_rule_options(cfg))
    assert (
        stored["model"]["out_ln"] is True and stored["model"]["residual"] is True
    )  # resmlp's, written out
    records = folder.read_metrics()
    assert [r["epoch"] for r in records] == [0, 1, 2]  # epoch 0: the diagnostics before any update
    for key in (
        "train/loss",
        "train/acc",
        "test/loss",
        "test/acc",
        "lr",
        "time/epoch_s",
        "diag/d1",
        "diag/gL_norm",
        "credit/deep_cos",
    ):
        assert key in records[1]
    assert {"diag/d1", "diag/gL_norm", "credit/deep_cos"} <= set(records[0])
    assert (
        "credit/rho_deep" in records[2] and "credit/rho_deep" not in records[1]
    )  # full probe: the last epoch
    assert records[2]["train/loss"] < records[1]["train/loss"]
    prov = summary["provenance"]
    for key in ("torch", "python", "git_commit", "git_dirty"):
        assert key in prov
    assert summary["wall_s"] > 0 and summary["final"] == records[-1]
    # Nothing is ever stored with pickle: the checkpoint is a safetensors file.
    from safetensors import safe_open

    with safe_open(str(folder.last_checkpoint), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("model") for k in keys) and any(
        k.startswith("optimizer") for k in keys
    ), keys[:5]


def test_same_seed_same_metrics_and_finished_run_is_skipped(tmp_path):
    a = tiny_config(tmp_path / "a")
    b = tiny_config(tmp_path / "b")
    train(a)
    train(b)
    assert run_metrics(a) == run_metrics(b)
    mtime = _folder(a).metrics_path.stat().st_mtime_ns
    again = train(a)
    assert again["status"] == "finished"
    assert _folder(a).metrics_path.stat().st_mtime_ns == mtime  # skipped: nothing rewritten


def test_resume_gives_the_same_final_metrics(tmp_path):
    full = tiny_config(tmp_path / "full", "epochs=3")
    train(full)
    cut = tiny_config(tmp_path / "cut", "epochs=3")
    first = train(cut, stop_after=1)
    assert first["status"] == "interrupted" and first["epochs_done"] == 1
    second = train(cut)
    assert second["status"] == "finished" and second["resumed_from"] == 1
    assert run_metrics(cut) == run_metrics(full)
    for name, tensor in _weights(full).items():
        assert torch.equal(tensor, _weights(cut)[name]), name


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    """Kill a real training process at an arbitrary point after its first epoch, then resume."""
    args = ["epochs=30", "d=64"]
    full = tiny_config(tmp_path / "full", *args)
    train(full)
    cut = tiny_config(tmp_path / "cut", *args)
    overrides = [
        f"{k}={v}"
        for k, v in (
            ("dataset", "digits"),
            ("arch", "resmlp"),
            ("d", 64),
            ("L", 2),
            ("epochs", 30),
            ("batch_size", 64),
            ("threads", 1),
            ("progress", "false"),
            ("results", cut.results),
            ("data_dir", cut.data.data_dir),
        )
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "creditaudit.cli", "train", "-q", *overrides],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    metrics = _folder(cut).metrics_path
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (
            metrics.exists() and metrics.read_text().count("\n") >= 3
        ):  # epochs 0, 1, 2: a checkpoint exists
            break
        time.sleep(0.005)
    if proc.poll() is not None:
        pytest.fail(f"the run ended before it could be killed: {proc.stderr.read().decode()}")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert _folder(cut).read_summary()["status"] == "running"  # killed: nobody wrote a final status
    resumed = train(cut)
    assert resumed["status"] == "finished" and resumed["resumed_from"] >= 1
    assert run_metrics(cut) == run_metrics(full)


def test_a_resumed_run_whose_metrics_lost_a_line_logs_every_epoch(tmp_path, capfd):
    """metrics.jsonl lost the record of the epoch its checkpoint holds (a torn last line): resuming
    from the checkpoint would leave that epoch out for good, so the run trains again from epoch 0,
    says so in one line, and ends with every epoch's record, equal to an uninterrupted run's."""
    full = tiny_config(tmp_path / "full", "rule=dfa", "epochs=3")
    train(full)
    cut = tiny_config(tmp_path / "cut", "rule=dfa", "epochs=3")
    assert train(cut, stop_after=2)["status"] == "interrupted"
    folder = RunFolder(run_dir(cut.results, cut.setting, cut.rule, cut.arch, cut.seed))
    lines = folder.metrics_path.read_text().splitlines(keepends=True)
    folder.metrics_path.write_text(
        "".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2]
    )  # epoch 2's line torn
    assert train(cut)["status"] == "finished"
    assert "lacks epoch(s) 2" in capfd.readouterr().err
    assert [r["epoch"] for r in run_metrics(cut)] == [0, 1, 2, 3]
    assert run_metrics(cut) == run_metrics(full)


def test_changed_config_in_an_existing_folder_is_refused(tmp_path):
    train(tiny_config(tmp_path, "epochs=1"))
    with pytest.raises(RunConfigMismatch, match="epochs: 1 -> 2"):
        train(tiny_config(tmp_path, "epochs=2"))
    # Non-semantic fields do not count.
    assert train(tiny_config(tmp_path, "epochs=1", "eval_batch_size=7"))["status"] == "finished"


NAN_RULE = """
import torch
from creditaudit.rules.base import RULES, Rule


@RULES.register("nan_credit", "a broken rule: its credit is NaN, so its run diverges on any platform")
class NanCredit(Rule):
    def credits(self, model, x, y, fwd):
        return [torch.full_like(h, float("nan")) for h in fwd.hs]
"""


def test_a_diverged_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    from creditaudit.jobs import run_many

    rule_file = tmp_path / "nan_rule.py"
    rule_file.write_text(NAN_RULE)
    broken = tiny_config(tmp_path, f"rule={rule_file}", "epochs=3")
    healthy = tiny_config(tmp_path, "rule=bp", "epochs=3")
    outcomes = {
        o.run.split("/")[-1].split("__")[0]: o for o in run_many([broken, healthy], workers=1)
    }
    assert outcomes["nan_credit"].status == "diverged" and outcomes["bp"].status == "finished"
    summary = _folder(broken).read_summary()
    assert (
        summary["status"] == "diverged"
        and "epoch 1" in summary["error"]
        and summary["epochs_done"] == 1
    )
    last = _folder(broken).read_metrics()[-1]["train/loss"]  # NaN is stored as null (strict JSON)
    assert last is None or not math.isfinite(last)


def test_crash_is_recorded_and_nothing_is_lost(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "epochs=3")
    train(cfg, stop_after=1)
    import creditaudit.training.run

    calls = {"n": 0}
    real = creditaudit.training.run.train_step

    def boom(run, x, y):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("simulated crash")
        return real(run, x, y)

    monkeypatch.setattr(creditaudit.training.run, "train_step", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg)
    summary = _folder(cfg).read_summary()
    assert summary["status"] == "failed" and "simulated crash" in summary["error"]
    assert [r["epoch"] for r in _folder(cfg).read_metrics()] == [0, 1]  # epochs 0 and 1 kept
    monkeypatch.setattr(creditaudit.training.run, "train_step", real)
    assert train(cfg)["status"] == "finished"


def test_frozen_variant_keeps_blocks_at_init(tmp_path):
    cfg = tiny_config(tmp_path, "rule=bp_frozen", "epochs=1")
    run = build_run(cfg)
    init = {n: p.detach().cpu().clone() for n, p in run.model.named_parameters()}
    train(cfg)
    final = _weights(cfg)
    for name, value in init.items():
        moved = not torch.equal(final[name], value)
        assert moved == (not name.startswith("blocks.")), name


def test_shallow_variant_has_no_blocks(tmp_path):
    cfg = tiny_config(tmp_path, "rule=bp_shallow", "epochs=1")
    assert build_run(cfg).model.L == 0
    assert train(cfg)["status"] == "finished"


def test_save_epochs_keeps_those_checkpoints(tmp_path):
    cfg = tiny_config(tmp_path, "epochs=2", "save_epochs=1")
    train(cfg)
    folder = _folder(cfg)
    assert folder.epoch_checkpoint(1).exists() and not folder.epoch_checkpoint(2).exists()
    state, meta = load_checkpoint(folder.epoch_checkpoint(1))
    assert int(meta["epoch"]) == 1 and "model" in state
