"""``ep``: credit quality at init, the β → 0 limits (error credit → g, displacement → its linear
response Σ_k J J^T g, a_0 → g_0), one local step on every architecture, reproducibility, options."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from creditaudit.config import ConfigError, TrainConfig, apply_overrides
from creditaudit.models import ARCHS, ModelConfig, build_model, true_grads
from creditaudit.models.base import preserved_buffers
from creditaudit.rules import build_rule, rule_options
from tests.conftest import SMALL_ARCHS


def _ep(**opts):
    rule, _ = build_rule("ep", opts)
    return rule


def _cos(a, g):  # mean per-sample cosine, no eps clamp
    a, g = a.flatten(1).double(), g.flatten(1).double()
    return ((a * g).sum(1) / (a.norm(dim=1) * g.norm(dim=1))).mean().item()


def _rel_err(a, g):  # mean per-sample ||a − g|| / ||g||
    return ((a - g).flatten(1).norm(dim=1) / g.flatten(1).norm(dim=1)).mean().item()


def _resmlp(d=32, L=4, dtype=torch.float32, B=32):
    model = build_model("resmlp", ModelConfig(d=d, L=L), (1, 8, 8), 10).to(dtype)
    x = torch.randn(B, 1, 8, 8, dtype=dtype)
    y = torch.randint(0, 10, (B,))
    fwd, gs = true_grads(model, x, y)
    return model, x, y, fwd, gs


# ---------------------------------------------------------------------------------------------
# Credit quality
# ---------------------------------------------------------------------------------------------
def test_cosine_to_true_gradient_at_init_on_resmlp():
    """docs/science.md §3: cos(a_l, g_l) >= 0.99 at every l = 0..L for β = 0.1, T = 20 (default α). Symmetric
    nudging and the prediction-error credit pass the same bar and are at least as good as the
    displacement credit up to 2e-3 (measured: all >= 0.999 here)."""
    model, x, y, fwd, gs = _resmlp(d=64, L=4, B=64)
    cosines = {}
    for name, opts in {
        "displacement": {},
        "symmetric": {"symmetric": True},
        "error": {"credit": "error"},
    }.items():
        credits = _ep(beta=0.1, T=20, **opts).credits(model, x, y, fwd)
        cosines[name] = [_cos(a, g) for a, g in zip(credits, gs, strict=True)]
    for name, cs in cosines.items():
        assert len(cs) == model.L + 1
        assert min(cs) >= 0.99, f"{name}: per-layer cosines {cs}"
        assert all(
            c >= c_disp - 2e-3 for c, c_disp in zip(cs, cosines["displacement"], strict=True)
        ), (name, cs)


def _plain_relaxation(model, hs, y, beta, T, alpha):
    """The nudged phase written naively: gradient descent on E + β·CE over the states themselves."""
    s = list(hs)
    for _ in range(T):
        free = [v.detach().requires_grad_(True) for v in s[1:]]
        st = [s[0], *free]
        energy = sum(
            0.5 * (st[l] - model.blocks[l - 1](st[l - 1])[0]).pow(2).sum()
            for l in range(1, model.L + 1)
        )
        cost = energy + beta * F.cross_entropy(model.readout(st[-1]), y, reduction="sum")
        s = [s[0]] + [
            v.detach() - alpha * g
            for v, g in zip(free, torch.autograd.grad(cost, free), strict=True)
        ]
    s0 = s[0].detach().requires_grad_(True)
    errors = [s[1] - model.blocks[0](s0)[0]] + [
        s[l] - model.blocks[l - 1](s[l - 1])[0] for l in range(2, model.L + 1)
    ]
    (d_s0,) = torch.autograd.grad(0.5 * errors[0].pow(2).sum(), s0)
    return s, [e.detach() for e in errors], d_s0


@pytest.mark.parametrize("arch", ARCHS.names())
def test_relaxation_matches_plain_gradient_descent_on_the_energy(arch):
    """Displacement form, skipped unmoved blocks and BatchNorm's batch coupling change nothing: the
    credits equal those of a naive descent on E + β·CE over s_1..s_L (float64, every architecture)."""
    cfg, shape = SMALL_ARCHS[arch]
    model = build_model(arch, cfg, shape, 5).double()
    x, y = torch.randn(6, *shape, dtype=torch.float64), torch.randint(0, 5, (6,))
    fwd = model.run(x, detach_inputs=True)
    hs = [h.detach() for h in fwd.hs]
    beta, T, alpha = 0.1, 6, 0.1
    with preserved_buffers(model):
        plus = _plain_relaxation(model, hs, y, beta, T, alpha)
        minus = _plain_relaxation(model, hs, y, -beta, T, alpha)
    expected = {
        "displacement": [plus[2] / beta]
        + [-(s - h) / beta for s, h in zip(plus[0][1:], hs[1:], strict=True)],
        "error": [plus[2] / beta] + [-e / beta for e in plus[1]],
        "symmetric": [(plus[2] - minus[2]) / (2 * beta)]
        + [-(p - m) / (2 * beta) for p, m in zip(plus[0][1:], minus[0][1:], strict=True)],
    }
    for name, opts in {
        "displacement": {},
        "error": {"credit": "error"},
        "symmetric": {"symmetric": True},
    }.items():
        credits = _ep(beta=beta, T=T, alpha=alpha, **opts).credits(model, x, y, fwd)
        for l, (a, e) in enumerate(zip(credits, expected[name], strict=True)):
            torch.testing.assert_close(
                a, e, rtol=1e-7, atol=1e-9 * e.abs().max().item(), msg=f"{arch} {name} a_{l}"
            )


def _linear_response(model, hs, gs):
    """β → 0, T → ∞ limit of the displacement credit: u_l = J_l u_{l−1} + g_l, u_0 = 0, i.e.
    u_l = Σ_{k≤l} J_{l←k} g_k (J_l: Jacobian of h_{l−1} ↦ h_l at the free state)."""
    us, u = [], torch.zeros_like(hs[0])
    for l in range(1, model.L + 1):
        _, ju = torch.func.jvp(lambda h, b=model.blocks[l - 1]: b(h)[0], (hs[l - 1],), (u,))
        u = ju + gs[l]
        us.append(u)
    return us


def test_ep_tends_to_bp_as_beta_shrinks():
    """With a converged relaxation (T = 150, α = 0.35): the error credit −ε_l/β → g_l at every layer,
    the displacement credit → Σ_k J_{l←k} g_k (norm ≈ l·‖g_l‖ at a near-identity residual net), and
    a_0 → g_0 in both modes; the error against the limit shrinks like β, and the symmetric estimate
    removes the O(β) term."""
    model, x, y, fwd, gs = _resmlp(d=16, L=4, dtype=torch.float64, B=8)
    converged = {"T": 150, "alpha": 0.35}
    limits = {"error": gs, "displacement": [gs[0]] + _linear_response(model, fwd.hs, gs)}
    betas = (0.5, 0.1, 0.02)
    credits = {
        (credit, beta): _ep(beta=beta, credit=credit, **converged).credits(model, x, y, fwd)
        for credit in limits
        for beta in betas
    }
    for credit, limit in limits.items():
        for l in range(model.L + 1):
            e = [_rel_err(credits[credit, beta][l], limit[l]) for beta in betas]
            assert e[0] > e[1] > 3 * e[2], (
                f"{credit}, layer {l}: relative error {e} does not shrink like β"
            )
            assert e[2] < 0.05, f"{credit}, layer {l}: relative error {e[2]:.3g} at β = 0.02"
    # The displacement's norm grows like l·‖g_l‖ through a near-identity residual stack (docs/science.md §3).
    for l in range(1, model.L + 1):
        a, g = credits["displacement", 0.02][l], gs[l]
        ratio = (a.flatten(1).norm(dim=1) / g.flatten(1).norm(dim=1)).mean().item()
        assert abs(ratio - l) < 0.15 * l, (l, ratio)
    symmetric = _ep(beta=0.1, credit="error", symmetric=True, **converged).credits(model, x, y, fwd)
    for l in range(model.L + 1):
        assert _rel_err(symmetric[l], gs[l]) < 0.3 * _rel_err(credits["error", 0.1][l], gs[l]), l


def test_shallow_model_gets_the_exact_gradient():
    """L = 0: nothing to relax, a_0 = (1/β) ∂C_β/∂s_0 = g_0 for any β."""
    model = build_model("resmlp", ModelConfig(d=16, L=0), (1, 8, 8), 10)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    fwd, gs = true_grads(model, x, y)
    for opts in ({}, {"symmetric": True}, {"credit": "error", "beta": 0.7}):
        (a0,) = _ep(**opts).credits(model, x, y, fwd)
        torch.testing.assert_close(a0, gs[0])


def test_credits_leave_gradients_and_buffers_alone():
    """The relaxation differentiates w.r.t. states only and restores BatchNorm's running stats."""
    cfg, shape = SMALL_ARCHS["smallcnn"]
    model = build_model("smallcnn", cfg, shape, 5)
    x, y = torch.randn(6, *shape), torch.randint(0, 5, (6,))
    fwd = model.run(x, detach_inputs=True)
    for p in model.parameters():
        p.grad = torch.full_like(p, 3.0)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    rule = _ep(symmetric=True, credit="error")
    credits = rule.credits(model, x, y, fwd)
    assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in model.parameters())
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert [a.shape for a in credits] == [h.shape for h in fwd.hs]
    metrics = rule.reported()  # what the trainer logs as rule/<key>
    assert set(metrics) == {"relax_ratio"} and math.isfinite(metrics["relax_ratio"].item())


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------
def test_defaults_and_cli_options():
    opts = rule_options("ep")
    assert (opts.beta, opts.T, opts.alpha, opts.symmetric, opts.credit) == (
        0.1,
        20,
        0.1,
        False,
        "displacement",
    )
    cfg = apply_overrides(
        TrainConfig(), ["rule=ep", "ep.beta=0.05", "T=7", "symmetric=true", "credit=error"]
    )
    opts = rule_options("ep", cfg.rule_opts)
    assert (opts.beta, opts.T, opts.symmetric, opts.credit) == (0.05, 7, True, "error")


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("beta", "0", "ep.beta=0.0: expected a finite number > 0"),
        ("beta", "-0.1", "ep.beta=-0.1: expected a finite number > 0"),
        (
            "beta",
            "inf",
            "ep.beta=inf: expected a finite number",
        ),  # refused by the general check first
        ("T", "0", "ep.T=0: expected an integer >= 1"),
        ("alpha", "0", "ep.alpha=0.0: expected a finite number > 0"),
        ("alpha", "-1", "ep.alpha=-1.0: expected a finite number > 0"),
        ("credit", "grad", "ep.credit='grad': expected one of displacement, error"),
    ],
)
def test_bad_options_are_refused(key, value, message):
    with pytest.raises(ConfigError, match=message):
        rule_options("ep", {key: value})
    with pytest.raises(ConfigError, match=message):
        apply_overrides(TrainConfig(), ["rule=ep", f"ep.{key}={value}"])
