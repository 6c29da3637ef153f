"""The speed-ups change no result: SmallCNN's channels-last layout computes what the NCHW model
computes, the allocator setting is per process and can be turned off, and a run trained in a worker
process packed with other runs gives exactly the metrics it gives when trained alone."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

from creditaudit.config import TrainConfig, apply_overrides
from creditaudit.jobs.processes import run_many
from creditaudit.models.base import build_model
from creditaudit.training.trainer import train
from tests.conftest import run_metrics, tiny_config


def test_smallcnn_states_are_channels_last_with_the_nchw_values():
    cfg = apply_overrides(TrainConfig(), ["arch=smallcnn", "d=32", "channels=4,8,8"])
    torch.manual_seed(0)
    net = build_model("smallcnn", cfg.model, (3, 16, 16), 10)
    ref = copy.deepcopy(net).to(memory_format=torch.contiguous_format)
    assert net.embed[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not ref.embed[0].weight.is_contiguous(memory_format=torch.channels_last)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    fwd, fwd_ref = net.run(x), ref.run(x)
    assert fwd.hs[0].is_contiguous(memory_format=torch.channels_last)
    for h, h_ref in zip(fwd.hs, fwd_ref.hs, strict=True):
        assert h.shape == h_ref.shape
        torch.testing.assert_close(
            h, h_ref, rtol=1e-4, atol=1e-5
        )  # float rounding of other kernels
    F.cross_entropy(fwd.logits, y).backward()
    F.cross_entropy(fwd_ref.logits, y).backward()
    for (name, p), p_ref in zip(net.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_smallcnn_checkpoint_round_trip_keeps_the_layout(tmp_path):
    """A resumed SmallCNN run is the run that was interrupted: train 1 epoch + resume = 2 epochs."""
    base = ("arch=smallcnn", "d=16", "channels=4,6,8", "L=3", "rule=dfa", "epochs=2")
    whole = tiny_config(tmp_path / "a", *base)
    train(whole)
    resumed = tiny_config(tmp_path / "b", *base)
    assert train(resumed, stop_after=1)["status"] == "interrupted"
    assert train(resumed)["status"] == "finished"
    assert run_metrics(whole) == run_metrics(resumed)


def _allocator_state(env: dict) -> str:
    code = (
        "from creditaudit.training.allocator import keep_freed_memory; print(keep_freed_memory())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_allocator_setting_applies_per_process_and_can_be_turned_off():
    assert _allocator_state({"CREDITAUDIT_MALLOC": ""}) == "True"
    assert _allocator_state({"CREDITAUDIT_MALLOC": "system"}) == "False"


def test_a_run_packed_with_others_in_a_worker_gives_its_metrics_alone(tmp_path):
    """Two worker processes train four runs of different rules and seeds side by side; each run's
    metrics (every loss, accuracy, diagnostic, per epoch) equal those of the same run trained by
    itself in this process."""
    packed = [
        tiny_config(tmp_path / "packed", f"rule={r}", f"seed={s}")
        for r, s in (("bp", 1), ("dfa", 1), ("ep", 2), ("dfa", 3))
    ]
    outcomes = run_many(packed, workers=2)
    assert sorted(o.status for o in outcomes) == ["finished"] * 4
    for cfg in packed[1:3]:
        alone = copy.deepcopy(cfg)
        alone.results = str(tmp_path / "alone" / "results")
        train(alone)
        assert run_metrics(cfg) == run_metrics(alone), cfg.rule
