"""Every registered rule × every architecture (timm's test_models style: nobody has to remember to
add a new rule here). One local training step through the real trainer path: finite loss, credits
of the right shape, the parameters that should move do, frozen ones do not; same seed, same metrics."""
from __future__ import annotations

import math

import pytest
import torch

from creditaudit.rules import RULES
from creditaudit.train.trainer import build_run, train, train_step
from tests.conftest import run_metrics, small_overrides, tiny_config

@pytest.fixture(params=RULES.names())
def rule(request):
    return request.param


def _step(tmp_path, rule: str, arch: str):
    sizes = small_overrides(arch, shallow=rule.endswith("_shallow"))
    cfg = tiny_config(tmp_path, f"rule={rule}", f"arch={arch}", *sizes, "batch_size=16")
    run = build_run(cfg)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    x, y = next(iter(run.loader.epoch(0)))
    loss, correct, _ = train_step(run, x, y)
    moved = {n for n, p in run.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    return run, loss.item() / y.shape[0], moved, (x, y)


def test_one_step_moves_what_it_should(tmp_path, rule, arch):
    run, loss, moved, (x, y) = _step(tmp_path, rule, arch)
    assert math.isfinite(loss)
    names = [n for n, _ in run.model.named_parameters()]
    for prefix in ("embed.", "head."):
        assert any(n.startswith(prefix) for n in moved), f"{rule}/{arch}: no {prefix} parameter moved"
    unmoved_blocks = [n for n in names if n.startswith("blocks.") and n not in moved]
    assert not unmoved_blocks, f"{rule}/{arch}: block parameters did not move: {unmoved_blocks}"
    if not run.rule.end_to_end:
        with run.rule.local_forward(run.model):
            fwd = run.model.run(x, detach_inputs=True)
            credits = run.rule.credits(run.model, x, y, fwd)
        assert [a.shape for a in credits] == [h.shape for h in fwd.hs]
        assert all(torch.isfinite(a).all() and not a.requires_grad for a in credits)


def test_frozen_variant_leaves_blocks_untouched(tmp_path, rule, arch):
    run, loss, moved, _ = _step(tmp_path, f"{rule}_frozen", arch)
    assert math.isfinite(loss)
    assert not any(n.startswith("blocks.") for n in moved)
    assert any(n.startswith("embed.") for n in moved) and any(n.startswith("head.") for n in moved)


def test_shallow_variant_trains(tmp_path, rule):
    run, loss, moved, _ = _step(tmp_path, f"{rule}_shallow", "resmlp")
    assert run.model.L == 0 and math.isfinite(loss) and any(n.startswith("embed.") for n in moved)


def test_same_seed_same_metrics(tmp_path, rule):
    runs = []
    for name in ("a", "b"):
        cfg = tiny_config(tmp_path / name, f"rule={rule}", "epochs=1", "d=16", "L=2")
        train(cfg)
        runs.append(run_metrics(cfg))
    assert runs[0] == runs[1]
