"""The local update of docs/science.md §1: with a_l = g_l and lam = 0 it equals autograd, for every
architecture, parameter for parameter; the alternative local rules and the penalty."""

from __future__ import annotations

import torch
from torch.nn import functional as F

from creditaudit.models import build_model, true_grads
from creditaudit.training.objective import LocalUpdate, local_objective, parse_local_update
from tests.conftest import SMALL_ARCHS


def _grads(model):
    return {
        n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in model.named_parameters()
    }


INNER = LocalUpdate("inner")


def _local_grads(model, x, y, credits, rule=INNER, lam=0.0):
    model.zero_grad(set_to_none=True)
    fwd = model.run(x, detach_inputs=True)
    (
        F.cross_entropy(fwd.logits, y)
        + local_objective(fwd, credits, rule=rule, lam=lam, train_blocks=True)
    ).backward()
    return _grads(model)


def test_local_update_with_true_credit_equals_autograd(arch):
    cfg, shape = SMALL_ARCHS[arch]
    model = build_model(arch, cfg, shape, 5).double()
    x = torch.randn(6, *shape, dtype=torch.float64)
    y = torch.randint(0, 5, (6,))
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    reference = _grads(model)

    _, gs = true_grads(model, x, y)  # per-sample g_l: gradient of the summed CE
    local = _local_grads(model, x, y, gs)
    assert set(local) == set(reference)
    for name in reference:
        torch.testing.assert_close(
            local[name], reference[name], rtol=1e-9, atol=1e-12, msg=f"{arch}: {name}"
        )


def test_shift_rule_first_step_is_a_normalised_inner_step():
    """At the current parameters, shift(eta) pulls with eta·a/||a||: the inner rule's gradient."""
    cfg, shape = SMALL_ARCHS["resmlp"]
    model = build_model("resmlp", cfg, shape, 4).double()
    x = torch.randn(5, *shape, dtype=torch.float64)
    y = torch.randint(0, 4, (5,))
    credits = [torch.randn_like(h) for h in model.run(x).hs]
    eta = 0.3
    shifted = _local_grads(model, x, y, credits, parse_local_update("shift(0.3)"))
    scaled = [eta * a / a.flatten(1).norm(dim=1).view(-1, *[1] * (a.dim() - 1)) for a in credits]
    inner = _local_grads(model, x, y, scaled)
    for name in inner:
        torch.testing.assert_close(shifted[name], inner[name], rtol=1e-9, atol=1e-12)


def test_cosine_rule_is_scale_free():
    cfg, shape = SMALL_ARCHS["resmlp"]
    model = build_model("resmlp", cfg, shape, 4).double()
    x = torch.randn(5, *shape, dtype=torch.float64)
    y = torch.randint(0, 4, (5,))
    credits = [torch.randn_like(h) for h in model.run(x).hs]
    g1 = _local_grads(model, x, y, credits, LocalUpdate("cosine"))
    g2 = _local_grads(model, x, y, [1e3 * a for a in credits], LocalUpdate("cosine"))
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name])


def test_penalty_adds_lam_times_branch_norm_gradient():
    cfg, shape = SMALL_ARCHS["resmlp"]
    model = build_model("resmlp", cfg, shape, 4).double()
    x = torch.randn(5, *shape, dtype=torch.float64)
    y = torch.randint(0, 4, (5,))
    zero = [torch.zeros_like(h) for h in model.run(x).hs]
    lam = 0.1
    with_pen = _local_grads(model, x, y, zero, lam=lam)
    without = _local_grads(model, x, y, zero, lam=0.0)
    # Reference: lam · mean_b ||f_l(sg h_{l-1})||² for block 1 alone.
    model.zero_grad(set_to_none=True)
    fwd = model.run(x, detach_inputs=True)
    (lam * fwd.fs[0].pow(2).sum(1).mean()).backward()
    for name, p in model.named_parameters():
        if name.startswith("blocks.0."):
            torch.testing.assert_close(with_pen[name] - without[name], p.grad)
        elif not name.startswith("blocks."):
            torch.testing.assert_close(with_pen[name], without[name])


def test_bad_local_rule_names_the_choices():
    import pytest

    from creditaudit.config import ConfigError

    for bad in ("shift", "shift(-1)", "shift(x)", "inner2"):
        with pytest.raises(ConfigError, match="shift\\(eta\\)"):
            parse_local_update(bad)


def test_shift_eta_only_scales_the_gradient_so_adamw_ignores_it_without_a_penalty():
    """The documented property of shift(eta) under AdamW: with lam = 0, one step is the same for
    eta (up to Adam's eps); with a penalty, eta sets the balance and the steps differ."""
    import copy

    from creditaudit.models import build_model
    from creditaudit.training.objective import local_objective, parse_local_update

    cfg, shape = SMALL_ARCHS["resmlp"]
    base = build_model("resmlp", cfg, shape, 10)
    x = torch.randn(16, *shape)

    def step(eta: float, lam: float) -> list[torch.Tensor]:
        model = copy.deepcopy(base)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
        fwd = model.run(x, detach_inputs=True)
        credits = [
            torch.randn_like(h, generator=torch.Generator().manual_seed(l))
            for l, h in enumerate(fwd.hs)
        ]
        local_objective(
            fwd, credits, rule=parse_local_update(f"shift({eta})"), lam=lam, train_blocks=True
        ).backward()
        opt.step()
        return [p.detach().clone() for p in model.blocks.parameters()]

    def gap(lam: float) -> float:  # largest parameter difference, in units of the learning rate
        return (
            max(
                float((a - b).abs().max())
                for a, b in zip(step(0.1, lam), step(1.0, lam), strict=True)
            )
            / 1e-2
        )

    assert gap(0.0) < 0.05  # eps's share only; AdamW's first step moves every parameter by ~lr
    assert gap(1.0) > 0.5


def test_bp_with_penalty_is_autograd_of_ce_plus_penalty(tmp_path):
    """The capacity-cost control: BP's step with lam > 0 follows autograd of CE + lam·Σ_l mean_b‖f_l‖²
    (parameter for parameter) and differs from the step without penalty."""
    import copy

    from creditaudit.training.run import build_run, train_step
    from tests.conftest import tiny_config

    lam = 1e-2
    grads = {}
    for value in (0.0, lam):
        run = build_run(tiny_config(tmp_path, "rule=bp", f"lam={value}", "w2_std=0.5"))
        x, y = next(iter(run.loader.epoch(0)))
        model = copy.deepcopy(run.model)
        train_step(run, x, y)
        grads[value] = {n: p.grad.clone() for n, p in run.model.named_parameters()}
        fwd = model.run(x)
        penalty = sum(f.flatten(1).pow(2).sum(1).mean() for f in fwd.fs)
        (F.cross_entropy(fwd.logits, y) + value * penalty).backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(
                grads[value][n], p.grad, rtol=1e-5, atol=1e-7, msg=f"lam={value}: {n}"
            )
    block = [n for n in grads[lam] if n.startswith("blocks.0.branch")]
    embed = [n for n in grads[lam] if n.startswith("embed")]
    assert block and embed
    for n in block + embed:  # the penalty reaches the blocks and, through h_0, the embedding
        assert not torch.allclose(grads[lam][n], grads[0.0][n]), n
