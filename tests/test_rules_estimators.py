"""The learned credit estimators ``sb``, ``cb``, ``vec`` and their shared helpers: each estimator
learns on a fixed model, cb's terminal matching aligns ∇V with g_L, the finite-difference targets
are the true directional derivatives, every rule × architecture takes a trainer step, checkpoints
resume exactly, and a seeded run is reproducible."""

from __future__ import annotations

import copy
import dataclasses
import functools
import statistics

import pytest
import torch
from torch.nn import functional as F

from creditaudit.errors import ConfigError
from creditaudit.models import build_model, true_grads
from creditaudit.rules import RuleContext, build_rule
from creditaudit.rules import _estimator as estimator
from creditaudit.runs.checkpoint import pack_state, unpack_state
from creditaudit.training.run import build_run, train_step
from creditaudit.training.trainer import train
from tests.conftest import SMALL_ARCHS, run_metrics, tiny_config

ESTIMATORS = ("sb", "cb", "vec")
CPU = torch.device("cpu")
# Small, fast estimators for the tests (the defaults are sized for d=256 models).
SMALL_OPTS = {"width": "32", "est_lr": "3e-3"}


def _ctx(num_classes: int = 5, total_steps: int = 1000) -> RuleContext:
    return RuleContext(
        device=CPU, num_classes=num_classes, steps_per_epoch=10, total_steps=total_steps, seed=0
    )


def _fixed_task(arch: str = "resmlp", n: int = 1024, C: int = 5):
    """A small model and a pool of inputs labelled by a fixed random linear teacher."""
    cfg, shape = SMALL_ARCHS[arch]
    torch.manual_seed(0)
    model = build_model(arch, cfg, shape, C)
    x = torch.randn(n, *shape)
    y = (x.flatten(1) @ torch.randn(x[0].numel(), C)).argmax(1)
    return model, x, y


def _rule(name: str, model, opts: dict | None = None, **ctx_kw):
    rule, _ = build_rule(name, {**SMALL_OPTS, **(opts or {})})
    rule.setup(model, _ctx(**ctx_kw))
    return rule


def _estimator_params(rule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in rule.net.named_parameters()}


FIT_STEPS = {"sb": 150, "cb": 400, "vec": 150}


@functools.cache
def _fit(name: str, steps: int | None = None, opts: tuple[tuple[str, str], ...] = ()):
    """Train one estimator on a fixed model (no model update); return (rule, model, losses)."""
    model, x, y = _fixed_task()
    rule = _rule(name, model, dict(opts))
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps or FIT_STEPS[name]):
        idx = torch.randint(0, x.shape[0], (64,), generator=gen)
        fwd = model.run(x[idx], detach_inputs=True)
        losses.append(float(rule.step(model, x[idx], y[idx], fwd)["loss"]))
    return rule, model, losses


# ---------------------------------------------------------------------------------------------
# Learning on a fixed model
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ESTIMATORS)
def test_estimator_loss_falls_on_a_fixed_model(name):
    _, _, losses = _fit(name)
    first, last = statistics.mean(losses[:20]), statistics.mean(losses[-20:])
    assert all(torch.isfinite(torch.tensor(losses)))
    assert last < 0.5 * first, (name, first, last)


def test_cb_terminal_matching_aligns_grad_V_with_g_L():
    rule, model, _ = _fit("cb")
    _, x, y = _fixed_task()
    x, y = x[:256], y[:256]
    _, gs = true_grads(model, x, y)
    a_L = rule.credits(model, x, y, model.run(x, detach_inputs=True))[-1]
    a, g = a_L.double().flatten(1), gs[-1].double().flatten(1)
    cos = (a * g).sum(1) / (a.norm(dim=1) * g.norm(dim=1))  # per sample, no eps
    assert cos.mean() > 0.9, float(cos.mean())


def _mean_cosines(rule, model) -> list[float]:
    _, x, y = _fixed_task()
    x, y = x[:256], y[:256]
    _, gs = true_grads(model, x, y)
    credits = rule.credits(model, x, y, model.run(x, detach_inputs=True))
    return [
        float(estimator.per_sample_cosine(a.double(), g.double()).mean())
        for a, g in zip(credits, gs, strict=True)
    ]


def test_vec_learns_credit_aligned_with_the_true_gradient():
    cosines = _mean_cosines(*_fit("vec")[:2])
    assert min(cosines) > 0.5, cosines  # ≈ 0.9 at every layer


def test_cb_consistency_carries_the_terminal_gradient_down_the_layers():
    """The soft-min bridge from V̄(h_{l+1}) teaches V(h_l) the loss-to-go: its gradient aligns with
    g_l at every depth (a fast EMA: the chain needs about L/(1 − ema) steps to settle)."""
    cosines = _mean_cosines(*_fit("cb", 300, (("ema", "0.95"),))[:2])
    assert min(cosines) > 0.7, cosines  # ≈ 0.95 at every layer


# ---------------------------------------------------------------------------------------------
# The math of the targets and helpers
# ---------------------------------------------------------------------------------------------
def test_forward_from_reproduces_the_logits_and_moves_no_statistics(arch):
    cfg, shape = SMALL_ARCHS[arch]
    model = build_model(arch, cfg, shape, 4)
    x = torch.randn(6, *shape)
    fwd = model.run(x)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    for l, h in enumerate(fwd.hs):
        torch.testing.assert_close(model.forward_from(l, h), fwd.logits)
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n


def test_vec_finite_difference_targets_are_directional_derivatives():
    model, x, y = _fixed_task()
    model = model.double()
    rule = _rule("vec", model)
    x, y = x[:32].double(), y[:32]
    fwd, gs = true_grads(model, x, y)
    for l in range(len(fwd.hs)):
        v = torch.randn(4, 32, fwd.hs[l][0].numel(), dtype=torch.float64)
        v = v / v.norm(dim=2, keepdim=True)
        t = rule.fd_targets(model, l, fwd.hs[l], y, v)
        exact = torch.einsum("bd,mbd->bm", gs[l].flatten(1), v)
        torch.testing.assert_close(t.double(), exact, rtol=2e-3, atol=2e-5)


def _cb_consistency_noise(rule, model, y, fwd) -> list[torch.Tensor]:
    """The noise σ·(…)·ξ that one ``cb`` step adds to each h_{l+1}, l = 0..L−1: (K, B, ...) each,
    read off the states the EMA target V̄ is evaluated on (the generator is restored after)."""
    seen = []
    value = type(rule).value

    def spy(net, hs, layers, s):
        if net is rule.target:
            seen.extend(hs)
        return value(net, hs, layers, s)

    state = rule.gen.get_state()
    rule.value = spy
    try:
        rule.step(model, None, y, fwd)
    finally:
        del rule.value
        rule.gen.set_state(state)
    return [
        (n.view(rule.opts.K, *h.shape) - h).detach() for n, h in zip(seen, fwd.hs[1:], strict=True)
    ]


@pytest.mark.parametrize("noise", ["absolute", "relative"])
def test_cb_consistency_noise_is_absolute_by_default(noise):
    """docs/science.md §3: the target copies are V̄(h_{l+1} + σξ) — noise of std σ whatever ‖h‖. The option
    noise=relative scales it by the per-sample RMS of h_{l+1} instead."""
    model, x, y = _fixed_task()
    x, y = x[:32], y[:32]
    opts = {} if noise == "absolute" else {"noise": "relative"}
    rule = _rule("cb", model, opts)
    fwd = model.run(x, detach_inputs=True)
    big = dataclasses.replace(fwd, hs=[100.0 * h for h in fwd.hs])
    base, scaled = (
        _cb_consistency_noise(rule, model, y, fwd),
        _cb_consistency_noise(rule, model, y, big),
    )
    for n, m, h in zip(base, scaled, fwd.hs[1:], strict=True):
        if noise == "absolute":
            torch.testing.assert_close(m, n, rtol=0, atol=1e-3)  # the same ξ: ‖h‖ plays no part
            assert abs(float(n.std()) - rule.opts.sigma) < 0.01, float(n.std())
        else:
            torch.testing.assert_close(m, 100.0 * n, rtol=1e-3, atol=1e-3)
            ratio = n.flatten(2).std(2) / estimator.rms(
                h.detach()
            )  # (K, B): σ per sample, in units of rms(h)
            assert abs(float(ratio.mean()) - rule.opts.sigma) < 0.02, float(ratio.mean())


@pytest.mark.parametrize("rms_out", [False, True])
def test_sb_bridge_sees_the_state_through_its_layer_norm_only(rms_out):
    """docs/science.md §3: G(LN h_l, τ(l), s). Multiplying h_l by c leaves ĥ_L unchanged (the LN takes the
    scale out) and divides the credit by c; the option rms_out=true gives back the scale, ĥ_L ∝ c."""
    model, x, y = _fixed_task()
    x, y = x[:16], y[:16]
    rule = _rule("sb", model, {"rms_out": "true"} if rms_out else {})
    fwd = model.run(x, detach_inputs=True)
    rule.ready(fwd.hs)
    s = estimator.terminal_code("error", fwd.logits, y)
    layers = list(range(len(fwd.hs)))
    c = 10.0
    hs = [h.detach() for h in fwd.hs]
    with torch.no_grad():
        pairs = list(
            zip(
                rule.bridge(hs, layers, s), rule.bridge([c * h for h in hs], layers, s), strict=True
            )
        )
    for p, q in pairs:
        want = c * p if rms_out else p  # the LN's eps makes it exact only up to ~1e-5 relative
        torch.testing.assert_close(q, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))
    if not rms_out:
        big = dataclasses.replace(fwd, hs=[c * h for h in fwd.hs])
        for a, b in zip(
            rule.credits(model, x, y, fwd), rule.credits(model, x, y, big), strict=True
        ):
            torch.testing.assert_close(c * b, a, rtol=1e-3, atol=1e-3 * float(a.abs().max()))


def test_sb_exact_terminal_gives_g_L_and_cb_warmup_gives_dfa_credit():
    model, x, y = _fixed_task()
    x, y = x[:16], y[:16]
    fwd, gs = true_grads(model, x, y)
    local = model.run(x, detach_inputs=True)
    sb = _rule("sb", model, {"exact_terminal": "true"})
    torch.testing.assert_close(sb.credits(model, x, y, local)[-1], gs[-1])

    cb = _rule("cb", model, {"dfa_warmup": "true", "warmup_frac": "0.5"}, total_steps=4)
    e = torch.softmax(fwd.logits, 1) - F.one_hot(y, 5).float()
    for step in range(4):
        credits = cb.credits(model, x, y, local)
        if step < 2:  # warm-up: a_l = B_lᵀ e_T with the fixed random B_l
            for a, B, h in zip(credits, cb.B, fwd.hs, strict=True):
                torch.testing.assert_close(a, (e @ B).view_as(h))
        else:  # afterwards: ∇V
            hs = [h.detach().requires_grad_(True) for h in fwd.hs]
            vs = cb.value(
                cb.net, hs, list(range(len(hs))), estimator.terminal_code("error", fwd.logits, y)
            )
            grads = torch.autograd.grad(sum(v.sum() for v in vs), hs)
            for a, g in zip(credits, grads, strict=True):
                torch.testing.assert_close(a, g)
        cb.step(model, x, y, local)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_estimator_is_the_same_built_in_setup_or_at_the_first_batch(name):
    """With the states' shapes in the context, setup builds the estimator; without, the first
    batch does — the same estimator either way (a function of the run seed and the shapes)."""
    model, x, _ = _fixed_task("smallcnn")
    shapes = tuple(tuple(h.shape[1:]) for h in model.run(x[:2]).hs)
    rules = []
    for ctx in (_ctx(), dataclasses.replace(_ctx(), state_shapes=shapes)):
        rule, _ = build_rule(name, SMALL_OPTS)
        torch.manual_seed(3)
        rule.setup(model, ctx)
        rules.append(rule)
    lazy, eager = rules
    assert lazy.net is None and eager.net is not None
    lazy.ready(model.run(x[:2]).hs)
    for (n, p), q in zip(eager.net.named_parameters(), lazy.net.parameters(), strict=True):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("name", ESTIMATORS)
def test_credits_touch_no_parameter_gradient(name):
    model, x, y = _fixed_task()
    rule = _rule(name, model)
    fwd = model.run(x[:16], detach_inputs=True)
    rule.step(model, x[:16], y[:16], fwd)  # leaves the estimator's .grad of that step
    model.zero_grad(set_to_none=True)
    est_grads = {n: p.grad.clone() for n, p in rule.net.named_parameters() if p.grad is not None}
    rule.credits(model, x[:16], y[:16], fwd)
    assert all(p.grad is None for p in model.parameters())
    for n, p in rule.net.named_parameters():
        assert (p.grad is None and n not in est_grads) or torch.equal(p.grad, est_grads[n]), n


def test_bad_options_are_config_errors():
    model, _, _ = _fixed_task()
    with pytest.raises(ConfigError, match="code"):
        _rule("sb", model, {"code": "logits"})
    with pytest.raises(ConfigError, match="temp"):
        _rule("cb", model, {"temp": "0"})


# ---------------------------------------------------------------------------------------------
# Every rule × every architecture through the trainer
# ---------------------------------------------------------------------------------------------
def _small_run(tmp_path, rule: str, arch: str):
    cfg = tiny_config(
        tmp_path,
        f"rule={rule}",
        f"arch={arch}",
        *[f"{rule.split('_')[0]}.{k}={v}" for k, v in SMALL_OPTS.items()],
    )
    cfg.model = copy.deepcopy(
        SMALL_ARCHS[arch][0]
    )  # the digits images (1, 8, 8) fit every small arch
    return build_run(cfg)


@pytest.mark.parametrize("name", ESTIMATORS)
def test_the_estimator_learns_in_step(tmp_path, name):
    """After the model's update, step() trains the rule's own estimator (tests/test_rules_all.py
    covers the model's side on every architecture and variant)."""
    run = _small_run(tmp_path, name, "resmlp")
    x, y = next(iter(run.loader.epoch(0)))
    rule = run.rule
    assert rule.net is not None  # built in setup, from the context's state shapes
    est_before = _estimator_params(rule)
    _, _, metrics = train_step(run, x, y)
    assert metrics and all(torch.isfinite(v) for v in metrics.values())
    for n, p in rule.net.named_parameters():
        # the shared trunk always learns; a layer's own adapter/head when that layer was trained
        # (vec probes fd_layers layers a step)
        if p.grad is not None or not (".adapters." in n or n.startswith("out.")):
            assert not torch.equal(p, est_before[n]), f"estimator parameter {n} did not move"


# ---------------------------------------------------------------------------------------------
# Checkpoints and reproducibility
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,opts", [("sb", {}), ("cb", {"dfa_warmup": "true"}), ("vec", {"fd_layers": "1"})]
)
def test_checkpoint_round_trip_continues_exactly(name, opts):
    model, x, y = _fixed_task(arch="smallcnn")
    rule = _rule(name, model, opts, total_steps=6)
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 96, 16)]
    for xb, yb in batches[:3]:
        rule.step(model, xb, yb, model.run(xb, detach_inputs=True))
    tensors, skeleton = pack_state(rule.state_dict())  # what a checkpoint stores (copies)

    fresh = _rule(name, model, opts, total_steps=6)
    fresh.load_state_dict(unpack_state(tensors, skeleton))
    for xb, yb in batches[3:]:
        fwd = model.run(xb, detach_inputs=True)
        for a, b in zip(
            rule.credits(model, xb, yb, fwd), fresh.credits(model, xb, yb, fwd), strict=True
        ):
            assert torch.equal(a, b)
        for r in (rule, fresh):
            r.step(model, xb, yb, fwd)
        for (n, p), q in zip(rule.net.named_parameters(), fresh.net.parameters(), strict=True):
            assert torch.equal(p, q), n
    final_a, final_b = pack_state(rule.state_dict())[0], pack_state(fresh.state_dict())[0]
    assert final_a.keys() == final_b.keys()
    for k in final_a:
        assert torch.equal(final_a[k], final_b[k]), k


@pytest.mark.parametrize(
    "name,opts", [("sb", []), ("cb", ["cb.dfa_warmup=true", "cb.warmup_frac=0.7"]), ("vec", [])]
)
def test_resumed_run_matches_an_uninterrupted_one(tmp_path, name, opts):
    """Through the trainer's own checkpoint file: estimator, optimizer, EMA target, generator and
    step counter all come back (cb's warm-up ends in the second epoch, after the resume)."""
    args = [f"rule={name}", "epochs=2", f"{name}.width=32", *opts]
    full, cut = tiny_config(tmp_path / "full", *args), tiny_config(tmp_path / "cut", *args)
    train(full)
    train(cut, stop_after=1)
    assert train(cut)["resumed_from"] == 1
    assert run_metrics(cut) == run_metrics(full)


@pytest.mark.parametrize(
    "name, option, value",
    [
        ("cb", "K", "0"),
        ("cb", "sigma", "-1"),
        ("cb", "noise", "gaussian"),
        ("cb", "ema", "1.5"),
        ("cb", "temp", "0"),
        ("sb", "width", "0"),
        ("vec", "M", "0"),
        ("vec", "eps", "0"),
        ("vec", "code", "onehot"),
    ],
)
def test_bad_estimator_options_are_refused_at_validation(name, option, value):
    """Checked when the config is validated, like every rule's options: no run is started with them."""
    from creditaudit.config import ConfigError, TrainConfig, apply_overrides

    with pytest.raises(ConfigError, match=rf"{name}\.{option}="):
        apply_overrides(TrainConfig(), [f"rule={name}", f"{name}.{option}={value}"])
