"""Diagnostics: the eps-free cosine, each measure on cases with known answers, the probe's keys."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from creditaudit.diagnostics import measures
from creditaudit.diagnostics.probe import DiagConfig, due, probe
from creditaudit.models import ModelConfig, build_model, true_grads
from creditaudit.rules import build_rule


def test_eps_free_cosine_differs_from_torch_when_g_is_tiny():
    torch.manual_seed(0)
    a = torch.randn(4, 64, dtype=torch.float64)
    g = (a + 0.1 * torch.randn_like(a)) * 1e-9  # nearly parallel, ‖g‖ ≈ 1e-8
    ours = measures.cosine(a, g)
    clamped = F.cosine_similarity(a, g, dim=1)  # torch clamps ‖a‖·‖g‖ at eps = 1e-8
    true = (a * g).sum(1) / (a.norm(dim=1) * g.norm(dim=1))
    torch.testing.assert_close(ours, true)
    assert (ours > 0.99).all()
    assert (clamped < 0.9 * ours).all(), (
        "torch's clamped cosine should shrink: the reason for the eps-free one"
    )


def test_cosine_is_float64_and_nan_for_a_zero_vector():
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    c = measures.cosine(a, b)
    assert c.dtype == torch.float64
    assert c[0].item() == pytest.approx(1 / math.sqrt(2)) and math.isnan(c[1].item())


def test_d2_is_measured_with_float64_norms_of_a_tiny_gradient():
    """A terminal LN at huge ‖h_L‖ gives ‖g_L‖ ≈ 1e-9: the probe must report it, not 0 or noise."""
    torch.manual_seed(0)
    model = build_model("resmlp", ModelConfig(d=16, L=1), (8,), 3)
    x = torch.randn(32, 8)
    with torch.no_grad():
        model.embed[1].weight.mul_(1e9)  # ‖h_0‖ ~ 1e9, so ‖g_L‖ ∝ 1/‖h_L‖ ~ 1e-9
        model.embed[1].bias.mul_(1e9)
    _, gs = true_grads(model.double(), x.double(), torch.randint(0, 3, (32,)))
    gl = measures.median(measures.norms(gs[-1]))
    assert 1e-12 < gl < 1e-7


def test_scale_ratios_and_median():
    hs = [torch.ones(3, 2), 10 * torch.ones(3, 2), 20 * torch.ones(3, 2)]
    assert measures.scale_ratios(hs) == pytest.approx([10.0, 2.0])


def test_predictivity_is_one_for_the_true_gradient_and_zero_for_noise():
    torch.manual_seed(0)
    model = build_model("resmlp", ModelConfig(d=16, L=2), (8,), 3).double()
    x, y = torch.randn(64, 8, dtype=torch.float64), torch.randint(0, 3, (64,))
    fwd, gs = true_grads(model, x, y)
    g = torch.Generator().manual_seed(0)
    assert (
        measures.predictivity(model, 1, fwd.hs[1], gs[1], y, dirs=8, eps=1e-4, generator=g) > 0.999
    )
    noise = torch.randn_like(gs[1])
    assert (
        abs(measures.predictivity(model, 1, fwd.hs[1], noise, y, dirs=8, eps=1e-4, generator=g))
        < 0.2
    )


def test_nudging_against_the_true_gradient_lowers_the_loss():
    torch.manual_seed(0)
    model = build_model("resmlp", ModelConfig(d=16, L=2), (8,), 3).double()
    x, y = torch.randn(64, 8, dtype=torch.float64), torch.randint(0, 3, (64,))
    fwd, gs = true_grads(model, x, y)
    assert measures.nudge(model, 1, fwd.hs[1], gs[1], y, eta=0.01, relative=False) < 0
    assert measures.nudge(model, 1, fwd.hs[1], -gs[1], y, eta=0.01, relative=False) > 0


def test_gradient_stability_of_identical_and_opposite_batches():
    g = torch.randn(8, 5)
    assert measures.gradient_stability([g, g, g]) == pytest.approx(1.0)
    assert measures.gradient_stability([g, -g]) == pytest.approx(-1.0)


def test_due_probes_epoch_0_every_nth_epoch_the_last_fully_and_nothing_when_disabled():
    cfg = DiagConfig(every=2, full_every=0)
    assert due(cfg, 0, 10) == (True, False) and due(cfg, 10, 10) == (True, True)
    assert due(cfg, 1, 10) == (False, False) and due(cfg, 4, 10) == (True, False)
    assert due(DiagConfig(enabled=False), 0, 10) == (False, False)


def test_probe_for_bp_gives_perfect_credit_and_leaves_the_model_alone(arch):
    from types import SimpleNamespace

    from tests.conftest import SMALL_ARCHS

    cfg, shape = SMALL_ARCHS[arch]
    torch.manual_seed(0)
    model = build_model(arch, cfg, shape, 4)
    data = SimpleNamespace(
        x_test=torch.randn(40, *shape),
        y_test=torch.randint(0, 4, (40,)),
        x_train=torch.randn(40, *shape),
        y_train=torch.randint(0, 4, (40,)),
    )
    rule, _ = build_rule("bp")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    out = probe(
        model,
        rule,
        data,
        DiagConfig(eval_n=32, rho_n=32, rho_dirs=4, stab_batches=2, stab_batch_size=16),
        full=True,
        seed=0,
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    for l in range(model.L + 1):
        assert out[f"credit/cos_l{l}"] == pytest.approx(1.0, abs=1e-5)
    if model.L:
        assert out["credit/rho_deep"] > 0.99 and out["credit/nudge"] < 0
    for key in (
        "diag/d1",
        "diag/gL_norm",
        "diag/hL_norm",
        "diag/grad_stab",
        "diag/train_loss_fixed",
    ):
        assert key in out


def test_trajectory_summaries_are_the_quantiles_of_per_sample_norms():
    from creditaudit.diagnostics.probe import trajectory_summaries

    h = torch.arange(1, 11, dtype=torch.float32).view(10, 1) * torch.tensor(
        [[3.0, 4.0]]
    )  # norms 5, 10, ..., 50
    g = torch.full((10, 3), 1e-11, dtype=torch.float64)
    out = trajectory_summaries({"h": [h], "g": [g]})
    assert out["traj/h_l0_p50"] == pytest.approx(27.5) and out["traj/h_l0_mean"] == pytest.approx(
        27.5
    )
    assert out["traj/h_l0_p10"] == pytest.approx(9.5) and out["traj/h_l0_p90"] == pytest.approx(
        45.5
    )
    assert out["traj/g_l0_p50"] == pytest.approx(1e-11 * 3**0.5, rel=1e-12)  # resolved in float64


@pytest.mark.slow
def test_snapshot_evolution_runs_log_every_layers_trajectory_each_epoch(tmp_path):
    from creditaudit.training.trainer import train
    from tests.conftest import run_metrics, tiny_config

    cfg = tiny_config(tmp_path, "rule=dfa", "trajectory=true", "L=2")
    train(cfg)
    records = run_metrics(cfg)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    for r in records:
        for name in "hga":
            for l in range(3):
                assert (
                    r[f"traj/{name}_l{l}_p10"]
                    <= r[f"traj/{name}_l{l}_p50"]
                    <= r[f"traj/{name}_l{l}_p90"]
                )
        # diag/* take the lower median of 256 norms, traj/* the interpolated one: equal up to a step
        assert r["traj/h_l2_p50"] == pytest.approx(r["diag/hL_norm"], rel=0.02)
        assert r["traj/g_l2_p50"] == pytest.approx(r["diag/gL_norm"], rel=0.05)
    plain = tiny_config(tmp_path, "rule=dfa", "epochs=1", "setting=plain")
    train(plain)
    assert not any(k.startswith("traj/") for r in run_metrics(plain) for k in r)  # off by default
