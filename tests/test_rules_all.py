"""Every registered rule × every architecture × every variant (timm's test_models style: nobody has
to remember to add a new rule or architecture here). One training step through the real trainer
path: finite loss and rule metrics, credits of the right shape, the parameters that should move do
and frozen ones do not, no layer left patched; and the same seed gives the same metrics. This is
the one place these properties are tested for every rule; the rule files' own tests pin their math."""
from __future__ import annotations

import math

import pytest
import torch

from creditaudit.rules import RULES
from creditaudit.rules.base import VARIANTS
from creditaudit.train.run import build_run, train_step
from creditaudit.train.trainer import train
from tests.conftest import run_metrics, small_overrides, tiny_config


@pytest.fixture(params=RULES.names())
def rule(request):
    return request.param


@pytest.mark.parametrize("variant", ["", *(f"_{v}" for v in VARIANTS)])
def test_one_step_moves_what_it_should(tmp_path, rule, arch, variant):
    name = rule + variant
    cfg = tiny_config(tmp_path, f"rule={name}", f"arch={arch}", *small_overrides(arch, shallow=variant == "_shallow"),
                      "batch_size=16")
    run = build_run(cfg)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    x, y = next(iter(run.loader.epoch(0)))
    loss, _, metrics = train_step(run, x, y)
    assert math.isfinite(loss.item()), name
    assert all(math.isfinite(float(v)) for v in metrics.values()), (name, metrics)
    moved = {n for n, p in run.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    blocks = {n for n in before if n.startswith("blocks.")}
    assert any(n.startswith("embed.") for n in moved) and any(n.startswith("head.") for n in moved), f"{name}/{arch}"
    if variant == "_frozen":
        assert not moved & blocks, f"{name}/{arch}: frozen blocks moved: {sorted(moved & blocks)}"
    else:
        assert blocks <= moved, f"{name}/{arch}: block parameters did not move: {sorted(blocks - moved)}"
    assert (run.model.L == 0) == (variant == "_shallow")
    # a rule that patches layers for its update (textbook FA and its kin) leaves them plain again
    assert not any("forward" in m.__dict__ for m in run.model.modules()), f"{name}/{arch}: a layer is still patched"
    if not run.rule.end_to_end:
        with run.rule.local_forward(run.model):
            fwd = run.model.run(x, detach_inputs=True)
            credits = run.rule.credits(run.model, x, y, fwd)
        assert len(credits) == len(fwd.hs)
        for a, h in zip(credits, fwd.hs):
            assert a.shape == h.shape and a.dtype == h.dtype, f"{name}/{arch}"
            assert torch.isfinite(a).all() and not a.requires_grad, f"{name}/{arch}"


def test_same_seed_same_metrics(tmp_path, rule):
    runs = []
    for name in ("a", "b"):
        cfg = tiny_config(tmp_path / name, f"rule={rule}", "epochs=1", "d=16", "L=2")
        assert train(cfg)["status"] == "finished"
        runs.append(run_metrics(cfg))
    assert runs[0] == runs[1]
