"""The sign-symmetry rules ``usf``, ``frsf``, ``brsf`` and Kolen–Pollack ``kp`` (layerwise feedback B in
place of every weight transpose, ``rules/_layerwise.py``): credits against a hand-written backward,
sign concordance at every step, brsf's per-step draws (seeded, resumable), frsf's fixed magnitudes,
kp = BP when B_0 = W_0, kp's decay of B − W and its falling angle on a small task, checkpoints.
``tests/test_rules_all.py`` gives each of them the one-step test on every architecture."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from creditaudit.errors import ConfigError
from creditaudit.models import build_model, true_grads
from creditaudit.rules import RuleContext, build_rule, rule_options
from creditaudit.rules._layerwise import alignment
from creditaudit.rules.kp import decay_factor
from creditaudit.runs.checkpoint import load_checkpoint, save_checkpoint
from creditaudit.training.objective import LocalUpdate, local_objective
from creditaudit.training.run import build_run, train_step
from creditaudit.training.trainer import train
from tests.conftest import SMALL_ARCHS, run_metrics, tiny_config

SIGN_RULES = ("usf", "frsf", "brsf")
RULES = (*SIGN_RULES, "kp")


def _ctx(model, input_shape: tuple[int, ...]) -> RuleContext:
    state_shapes, norm_shape = model.shapes(input_shape)
    return RuleContext(
        device=torch.device("cpu"),
        num_classes=model.num_classes,
        steps_per_epoch=1,
        total_steps=1,
        seed=0,
        state_shapes=tuple(state_shapes),
        norm_shape=norm_shape,
    )


def _cfg(tmp_path, rule: str, arch: str = "resmlp", *overrides: str):
    cfg = tiny_config(tmp_path, f"rule={rule}", f"arch={arch}", *overrides)
    cfg.model = dataclasses.replace(SMALL_ARCHS[arch][0])
    return cfg


def _credits(rule, model, x, y):
    with rule.local_forward(model):
        fwd = model.run(x, detach_inputs=True)
        return fwd, rule.credits(model, x, y, fwd)


def _feedback(rule, model) -> dict[str, torch.Tensor]:
    """The B each patched layer would use right now."""
    return {n: rule.feedback_for(n, m).clone() for n, m in rule.layers(model)}


def _local_step(rule, model, opt, x, y) -> list[torch.Tensor]:
    """One step of the trainer's path (local forward, credits, local objective, optimizer, rule.step)."""
    opt.zero_grad(set_to_none=True)
    with rule.local_forward(model):
        fwd = model.run(x, detach_inputs=True)
        credits = rule.credits(model, x, y, fwd)
        (
            F.cross_entropy(fwd.logits, y)
            + local_objective(fwd, credits, rule=LocalUpdate("inner"), lam=0.0, train_blocks=True)
        ).backward()
    opt.step()
    rule.step(model, x, y, fwd)
    return credits


# ---------------------------------------------------------------------------------------------
# credits against a hand-written backward
# ---------------------------------------------------------------------------------------------
def _hand_backward(
    model, h0: torch.Tensor, y: torch.Tensor, B: dict[str, torch.Tensor]
) -> list[torch.Tensor]:
    """d(Σ_i CE_i)/d h_l, l = 0..L, of a non-residual net, written layer by layer: a Linear sends
    dy·B back, a convolution (stride 1) the transposed convolution of dy with B; every other layer
    (activations, BatchNorm in train mode, pooling, flatten, the terminal norm) its exact
    vector-Jacobian product."""
    stages, h = [], h0
    for l, block in enumerate(model.blocks):
        assert not block.residual
        for i, mod in enumerate(block.branch):
            stages.append((f"blocks.{l}.branch.{i}", mod, h, l))
            h = mod(h)
    hL = h.detach().requires_grad_(True)
    z = model.norm(hL)
    o = model.head(z)
    e = torch.softmax(o, 1) - F.one_hot(y, o.shape[1]).to(o.dtype)  # (B, C): d Σ CE / d o
    (dh,) = torch.autograd.grad(z, hL, e @ B["head"])
    credits = [dh]
    for name, mod, x, _ in reversed(stages):
        if isinstance(mod, nn.Linear):
            dh = dh @ B[name]
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            assert set(mod.stride) == {1}
            transpose = F.conv_transpose2d if isinstance(mod, nn.Conv2d) else F.conv_transpose1d
            dh = transpose(dh, B[name], padding=mod.padding)
        else:
            xi = x.detach().requires_grad_(True)
            (dh,) = torch.autograd.grad(mod(xi), xi, dh)
        if name.endswith(".branch.0"):  # the first layer of block l: dh is the credit at h_{l-1}
            credits.insert(0, dh)
    return [c.detach() for c in credits]


@pytest.mark.parametrize("arch", ["mlp", "smallcnn", "smallcnn1d"])
@pytest.mark.parametrize("rule_name", SIGN_RULES)
def test_sign_feedback_credits_equal_a_hand_written_backward(arch, rule_name):
    """Before and after three AdamW steps (signs of W flip; s stays the std of W's init): the credits
    equal a hand-written backward with B = s·sign(W) (usf; s computed here from a copy of the initial
    weights) or |R|∘sign(W) (frsf, brsf; |R| the rule's current draw)."""
    cfg, shape = SMALL_ARCHS[arch]
    model = build_model(arch, cfg, shape, 5).double()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randn(6, *shape, dtype=torch.float64), torch.randint(0, 5, (6,))
    rule, _ = build_rule(rule_name)
    rule.setup(model, _ctx(model, shape))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.01)
    flips = 0
    for step in range(4):
        names = [n for n, _ in rule.layers(model)]
        if rule_name == "usf":
            B = {
                n: init[f"{n}.weight"].std() * torch.sign(model.get_submodule(n).weight.detach())
                for n in names
            }
        else:
            B = {
                n: rule.magnitude[n].double() * torch.sign(model.get_submodule(n).weight.detach())
                for n in names
            }
        fwd, credits = _credits(rule, model, x, y)
        expected = _hand_backward(model, fwd.hs[0].detach(), y, B)
        assert len(credits) == len(expected) == model.L + 1
        for l, (a, b) in enumerate(zip(credits, expected, strict=True)):
            torch.testing.assert_close(
                a, b, rtol=1e-10, atol=1e-12, msg=f"{rule_name}/{arch} step {step}: a_{l}"
            )
        before = {n: torch.sign(model.get_submodule(n).weight.detach()) for n in names}
        _local_step(rule, model, opt, x, y)
        flips += sum(
            int((torch.sign(model.get_submodule(n).weight.detach()) != before[n]).sum())
            for n in names
        )
    assert flips > 0  # the steps did flip signs, so "the current W" was really tested


@pytest.mark.parametrize("rule_name", SIGN_RULES)
def test_sign_concordance_every_step(tmp_path, rule_name):
    """Through the trainer on vit_mini (every matrix of attention and MLP patched): sign(B) = sign(W)
    before every step. |B| stays s (usf), stays |R| (frsf), changes every step (brsf)."""
    run = build_run(_cfg(tmp_path, rule_name, "vit_mini", "batch_size=32"))
    first = None
    for i, (x, y) in enumerate(run.loader.epoch(0)):
        if i == 4:
            break
        Bs = _feedback(run.rule, run.model)
        for n, m in run.rule.layers(run.model):
            assert torch.equal(torch.sign(Bs[n]), torch.sign(m.weight.detach())), n
        mags = {n: B.abs() for n, B in Bs.items()}
        if first is None:
            first = mags
        elif rule_name == "brsf":
            assert all(not torch.equal(mags[n], first[n]) for n in mags)
        else:
            for n in mags:
                nz = run.model.get_submodule(n).weight.detach() != 0
                assert torch.equal(mags[n][nz], first[n][nz]), n
        if rule_name == "usf":
            for n, _ in run.rule.layers(run.model):
                assert torch.unique(mags[n]).numel() == 1  # one number s per layer
        train_step(run, x, y)


def test_usf_scale_is_the_std_of_the_initial_weights():
    model = build_model("resmlp", SMALL_ARCHS["resmlp"][0], (64,), 10)
    rule, _ = build_rule("usf")
    rule.setup(model, _ctx(model, (64,)))
    s = {n: float(m.weight.detach().std()) for n, m in rule.layers(model)}
    assert rule.init_std == pytest.approx(s)
    assert rule.init_std["blocks.0.branch.fc2"] == pytest.approx(
        0.01, rel=0.2
    )  # resmlp's W2 ~ N(0, 0.01²)
    Bs = _feedback(rule, model)
    assert float(Bs["head"].abs().max()) == pytest.approx(s["head"])


def test_frsf_and_brsf_magnitudes_have_the_spread_of_the_init():
    model = build_model("resmlp", dataclasses.replace(SMALL_ARCHS["resmlp"][0], d=128), (64,), 10)
    for name in ("frsf", "brsf"):
        rule, _ = build_rule(name)
        rule.setup(model, _ctx(model, (64,)))
        M = rule.magnitude["blocks.0.branch.fc1"]
        s = rule.init_std["blocks.0.branch.fc1"]
        assert (M >= 0).all()
        assert float(M.pow(2).mean().sqrt()) == pytest.approx(s, rel=0.05)  # |R| with R ~ N(0, s²)


# ---------------------------------------------------------------------------------------------
# brsf: the per-step draws are seeded and resumable
# ---------------------------------------------------------------------------------------------
def _magnitudes_over_steps(run, steps: int) -> list[dict[str, torch.Tensor]]:
    out = [{n: M.clone() for n, M in run.rule.magnitude.items()}]
    for i, (x, y) in enumerate(run.loader.epoch(0)):
        if i == steps:
            break
        train_step(run, x, y)
        out.append({n: M.clone() for n, M in run.rule.magnitude.items()})
    return out


def test_brsf_draws_are_a_function_of_the_seed_and_resume(tmp_path):
    a = _magnitudes_over_steps(build_run(_cfg(tmp_path / "a", "brsf", "smallcnn", "seed=7")), 3)
    torch.rand(100)  # whatever happened to the global RNG in between does not matter
    b = _magnitudes_over_steps(
        build_run(_cfg(tmp_path / "b", "brsf", "smallcnn", "seed=7", "batch_size=32", "lr=0.1")), 3
    )
    c = _magnitudes_over_steps(build_run(_cfg(tmp_path / "c", "brsf", "smallcnn", "seed=8")), 3)
    for t, (ma, mb, mc) in enumerate(zip(a, b, c, strict=True)):
        for n in ma:
            assert torch.equal(ma[n], mb[n]), (
                t,
                n,
            )  # same seed: the same draws, whatever the data and lr
            assert not torch.equal(ma[n], mc[n]), (t, n)
            if t:
                assert not torch.equal(ma[n], a[t - 1][n])  # a fresh draw every step
    # resume: from a checkpoint after two steps, the next draws are the uninterrupted run's
    run = build_run(_cfg(tmp_path / "d", "brsf", "smallcnn", "seed=7"))
    _magnitudes_over_steps(run, 2)
    save_checkpoint(tmp_path / "ck.safetensors", {"rule": run.rule.state_dict()})
    state, _ = load_checkpoint(tmp_path / "ck.safetensors")
    other = build_run(_cfg(tmp_path / "e", "brsf", "smallcnn", "seed=99"))
    other.rule.load_state_dict(state["rule"])
    assert other.rule.draws == 3
    for t in (2, 3):
        for n in a[t]:
            assert torch.equal(other.rule.magnitude[n], a[t][n]), (t, n)
        other.rule.step(other.model, None, None, None)


@pytest.mark.parametrize("rule_name", ("brsf", "kp"))
def test_same_metrics_when_resumed(tmp_path, rule_name):
    """brsf's generator and kp's learned B come back from the epoch checkpoint: a run stopped after
    one epoch and resumed logs what an uninterrupted one does."""
    a = tiny_config(tmp_path / "a", f"rule={rule_name}", "epochs=2")
    b = tiny_config(tmp_path / "b", f"rule={rule_name}", "epochs=2")
    train(a)
    assert train(b, stop_after=1)["status"] == "interrupted"
    assert train(b)["resumed_from"] == 1
    assert run_metrics(a) == run_metrics(b)
    assert math.isfinite(run_metrics(a)[-1]["train/loss"])


@pytest.mark.parametrize("rule_name", RULES)
def test_checkpoint_round_trip_restores_the_feedback(tmp_path, rule_name):
    run = build_run(_cfg(tmp_path / "a", rule_name, "smallcnn", "seed=3"))
    x, y = next(iter(run.loader.epoch(0)))
    train_step(run, x, y)  # brsf has redrawn, kp's B has moved
    _, credits = _credits(run.rule, run.model, x, y)
    save_checkpoint(tmp_path / "ck.safetensors", {"rule": run.rule.state_dict()})
    state, _ = load_checkpoint(tmp_path / "ck.safetensors")
    other = build_run(_cfg(tmp_path / "b", rule_name, "smallcnn", "seed=4"))
    other.model.load_state_dict(run.model.state_dict())
    other.rule.load_state_dict(state["rule"])
    _, again = _credits(other.rule, other.model, x, y)
    for a, b in zip(credits, again, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("rule_name", ("frsf", "kp"))
def test_random_feedback_is_a_function_of_the_seed_alone(tmp_path, rule_name):
    def state(sub, *over):
        run = build_run(_cfg(tmp_path / sub, rule_name, "vit_mini", *over))
        return run.rule.magnitude if rule_name == "frsf" else run.rule.feedback

    a = state("a", "seed=7")
    torch.rand(100)
    b = state("b", "seed=7", "batch_size=32", "lr=0.1")
    c = state("c", "seed=8")
    assert a and all(torch.equal(a[n], b[n]) for n in a)
    assert not any(torch.equal(a[n], c[n]) for n in a)


# ---------------------------------------------------------------------------------------------
# kp: B receives W's update and decay
# ---------------------------------------------------------------------------------------------
def _grads(model) -> dict[str, torch.Tensor]:
    return {
        n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in model.named_parameters()
    }


def test_kp_with_feedback_initialised_to_weights_is_bp_step_after_step(arch):
    """B_0 = W_0: at every step the credits are the true gradients, every parameter gets autograd's
    CE gradient, and after AdamW's step (decay on) B = W bit for bit."""
    cfg, shape = SMALL_ARCHS[arch]
    model = build_model(arch, cfg, shape, 5).double()
    rule = build_rule("kp", {"init": "weights"})[0]
    rule.setup(model, _ctx(model, shape))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.1)
    for step in range(3):
        x, y = torch.randn(6, *shape, dtype=torch.float64), torch.randint(0, 5, (6,))
        reference = copy.deepcopy(model)
        F.cross_entropy(reference(x), y).backward()
        _, gs = true_grads(reference, x, y)
        credits = _local_step(rule, model, opt, x, y)
        for l, (a, g) in enumerate(zip(credits, gs, strict=True)):
            torch.testing.assert_close(
                a, g, rtol=1e-9, atol=1e-12, msg=f"{arch} step {step}: a_{l}"
            )
        local, exact = _grads(model), _grads(reference)
        for n in exact:
            torch.testing.assert_close(
                local[n], exact[n], rtol=1e-9, atol=1e-12, msg=f"{arch} step {step}: {n}"
            )
        for n, m in rule.layers(model):
            assert torch.equal(rule.feedback[n], m.weight.detach()), (step, n)


def test_kp_difference_decays_like_the_weights(tmp_path):
    """Through the trainer (AdamW, cosine schedule, one group per block): B_t − W_t = Π_s (1 − lr_s·wd)
    · (B_0 − W_0) — both receive the same gradient-driven step and each its own decay. (B ← B + ΔW
    would keep B − W = B_0 − W_0.) A frozen block's B does not move."""
    run = build_run(_cfg(tmp_path / "a", "kp", "resmlp", "weight_decay=0.5", "lr=0.01"))
    layers = run.rule.layers(run.model)
    D0 = {n: run.rule.feedback[n] - m.weight.detach() for n, m in layers}
    factor = 1.0
    for i, (x, y) in enumerate(run.loader.epoch(0)):
        if i == 10:
            break
        train_step(run, x, y)
        factor *= 1.0 - run.optimizer.param_groups[0]["lr"] * 0.5
    assert factor < 0.96
    for n, m in layers:
        torch.testing.assert_close(
            run.rule.feedback[n] - m.weight.detach(), factor * D0[n], rtol=1e-4, atol=1e-6, msg=n
        )

    frozen = build_run(_cfg(tmp_path / "b", "kp_frozen", "resmlp", "weight_decay=0.5", "lr=0.01"))
    B0 = {n: B.clone() for n, B in frozen.rule.feedback.items()}
    x, y = next(iter(frozen.loader.epoch(0)))
    train_step(frozen, x, y)
    assert all(torch.equal(frozen.rule.feedback[n], B0[n]) for n in B0 if n.startswith("blocks."))
    assert not torch.equal(frozen.rule.feedback["head"], B0["head"])


def test_kp_angle_between_feedback_and_weights_falls_on_a_small_task(tmp_path):
    """From random B_0 (the default), on digits with resmlp d=32 L=2, the seed's recipe (AdamW lr 1e-3,
    weight decay 0.01, cosine over 6 epochs of 23 steps), the angle ∠(B, W) of every patched layer
    falls after every epoch. Measured (degrees, epochs 0..6; fc1/fc2 of blocks 0, 1, then the head):

        epoch  b0.fc1  b0.fc2  b1.fc1  b1.fc2   head
          0     92.66   85.20   94.46   91.61   91.30
          1     91.80   82.49   91.76   81.41   89.61
          2     88.84   76.63   87.81   73.58   83.97
          3     86.41   72.73   85.19   69.83   78.61
          4     84.94   70.69   83.73   68.05   75.32
          5     84.34   69.93   83.15   67.37   74.00
          6     84.25   69.81   83.07   67.27   73.80

    (most of the fall comes from the shared updates growing a common part of B and W; the decay
    (1 − lr·wd) per step shrinks B − W by under 0.1% over these 138 steps.)"""
    run = build_run(tiny_config(tmp_path, "rule=kp", "epochs=6"))
    layers = run.rule.layers(run.model)

    def angles() -> list[float]:
        return [
            math.degrees(math.acos(float(alignment(run.rule.feedback[n], m.weight))))
            for n, m in layers
        ]

    curve = [angles()]
    for epoch in range(6):
        for x, y in run.loader.epoch(epoch):
            train_step(run, x, y)
        curve.append(angles())
    print("kp angle(B, W) per epoch, degrees, layers", [n for n, _ in layers])
    for epoch, row in enumerate(curve):
        print(epoch, " ".join(f"{a:6.2f}" for a in row))
    for before, after in itertools.pairwise(curve):
        assert all(a < b for a, b in zip(after, before, strict=True)), (before, after)
    assert all(a < b - 5 for a, b in zip(curve[-1], curve[0], strict=True))


def test_kp_decay_factor_per_optimizer():
    p = nn.Parameter(torch.zeros(2, 2))
    adamw = torch.optim.AdamW([p], lr=0.1, weight_decay=0.01)
    assert decay_factor(adamw, adamw.param_groups[0]) == pytest.approx(1 - 1e-3)
    sgd = torch.optim.SGD([p], lr=0.1, weight_decay=0.01)
    assert decay_factor(sgd, sgd.param_groups[0]) == pytest.approx(1 - 1e-3)
    no_decay = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    assert decay_factor(no_decay, no_decay.param_groups[0]) == 1.0
    for opt in (
        torch.optim.Adam([p], lr=0.1, weight_decay=0.01),
        torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01),
    ):
        with pytest.raises(NotImplementedError, match="kp: "):
            decay_factor(opt, opt.param_groups[0])


def test_options_are_checked_and_parsed():
    assert rule_options("usf", {"scale": "2"}).scale == 2.0
    assert rule_options("brsf", {"init": "uniform"}).init == "uniform"
    assert rule_options("kp", {"init": "weights"}).init == "weights"
    for name, opts in (
        ("usf", {"scale": "0"}),
        ("frsf", {"init": "weights"}),
        ("brsf", {"scale": "-1"}),
        ("kp", {"init": "sign"}),
        ("kp", {"scale": "nan"}),
    ):
        with pytest.raises(ConfigError, match=name):
            rule_options(name, opts)


def test_refuses_layers_it_cannot_patch():
    model = build_model("resmlp", SMALL_ARCHS["resmlp"][0], (4,), 3)
    ctx = _ctx(model, (4,))
    model.blocks[0].branch.fc1 = nn.ConvTranspose1d(16, 16, 1)
    for name in RULES:
        with pytest.raises(NotImplementedError, match=f"{name} replaces .*ConvTranspose1d"):
            build_rule(name)[0].setup(model, ctx)
