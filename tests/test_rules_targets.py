"""The target- and perturbation-based rules ``drtp``, ``pepita``, ``dtp`` and ``fwdgrad``: each one's
defining property pinned against an independent computation (DRTP's credit is the projected target
and ignores the output; PEPITA's update is the paper's, written out by hand on a two-hidden-layer
MLP; DTP with exact inverses points its targets down the gradient; the forward gradient is unbiased
and its per-direction Γ is the analytic one), and every one of them resumable from a checkpoint.
(One training step on every architecture and variant: tests/test_rules_all.py.)"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from creditaudit.models import ModelConfig, build_model, true_grads
from creditaudit.models.base import Block, CreditNet
from creditaudit.rules import RuleContext, build_rule
from creditaudit.rules.fwdgrad import _stream_seed, couples_samples
from creditaudit.runs.checkpoint import load_checkpoint, save_checkpoint
from creditaudit.training.objective import LocalUpdate, local_objective
from creditaudit.training.run import build_run, restore, run_meta, run_state, train_step
from tests.conftest import SMALL_ARCHS, tiny_config

RULES_HERE = ("drtp", "pepita", "dtp", "fwdgrad")


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


def _rule(name: str, model, input_shape, **options):
    rule, _ = build_rule(name, {k: str(v) for k, v in options.items()})
    rule.setup(model, _ctx(model, input_shape))
    return rule


def _credits(rule, model, x, y):
    fwd = model.run(x, detach_inputs=True)
    return fwd, rule.credits(model, x, y, fwd)


def _cos(a, b):
    """Per-sample cosine over flattened features, (B,)."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


# ---------------------------------------------------------------------------------------------
# drtp: a_l = B_l(−onehot y), whatever the network outputs
# ---------------------------------------------------------------------------------------------
def test_drtp_credit_is_the_projected_target_and_ignores_the_output(arch):
    cfg, shape = SMALL_ARCHS[arch]
    model = build_model(arch, cfg, shape, 5)
    rule = _rule("drtp", model, shape)
    x, y = torch.randn(6, *shape), torch.tensor([0, 3, 3, 1, 4, 2])
    _, credits = _credits(rule, model, x, y)
    for l, (a, B) in enumerate(zip(credits, rule.B, strict=True)):
        # column y_i of B_l, negated: selected by index, not by a product with the one-hot vector
        assert torch.equal(a.flatten(1), -B[:, y].T), f"a_{l}"
    # another input, another network (blocks and head redrawn): the same credits
    other = build_model(arch, cfg, shape, 5)
    with torch.no_grad():
        other.head.weight.mul_(-7.0)
    _, again = _credits(rule, other, 3 * torch.randn(6, *shape), y)
    assert all(torch.equal(a, b) for a, b in zip(credits, again, strict=True))


def test_drtp_matrices_are_the_papers_he_uniform():
    model = build_model("resmlp", ModelConfig(d=256, L=1), (1, 8, 8), 10)
    rule = _rule("drtp", model, (1, 8, 8))
    for B in rule.B:  # (n_l, C), U(±√(6/n_l)): variance 2/n_l
        n = B.shape[0]
        assert B.abs().max() <= math.sqrt(6 / n) and abs(B.var().item() * n / 2 - 1) < 0.1
    torch.manual_seed(0)
    again = _rule("drtp", build_model("resmlp", ModelConfig(d=256, L=1), (1, 8, 8), 10), (1, 8, 8))
    assert all(
        torch.equal(a, b) for a, b in zip(rule.B, again.B, strict=True)
    )  # a function of the run seed alone


# ---------------------------------------------------------------------------------------------
# pepita: the paper's update, by hand, on a bias-free ReLU MLP with two hidden layers
# ---------------------------------------------------------------------------------------------
def _pepita_updates(F_scale: float):
    """(this rule's weight gradients, the paper's ΔW written out by hand) for W1, W2 and the head."""
    torch.manual_seed(0)
    n_in, d, C, B = 64, 32, 10, 64
    model = CreditNet(
        nn.Sequential(nn.Linear(n_in, d, bias=False), nn.ReLU()),
        [Block(nn.Sequential(nn.Linear(d, d, bias=False), nn.ReLU()), residual=False)],
        nn.Identity(),
        nn.Linear(d, C, bias=False),
    )
    rule = _rule("pepita", model, (n_in,), F_scale=F_scale)
    x, y = torch.rand(B, n_in), torch.randint(0, C, (B,))  # image-like inputs in [0, 1]
    fwd, credits = _credits(rule, model, x, y)
    # the trainer's objective: exact CE for the readout + the local update with these credits
    (
        F.cross_entropy(fwd.logits, y)
        + local_objective(fwd, credits, rule=LocalUpdate("inner"), lam=0.0, train_blocks=True)
    ).backward()
    W1, W2, W3 = model.embed[0].weight, model.blocks[0].branch[0].weight, model.head.weight
    with (
        torch.no_grad()
    ):  # Dellaferrera & Kreiman 2022, Algorithm 1 (and its reference code's output layer)
        h1 = F.relu(x @ W1.T)
        h2 = F.relu(h1 @ W2.T)
        e = (h2 @ W3.T).softmax(1) - F.one_hot(y, C)
        x_m = x + e @ rule.F.T  # the input modulated by the projected error
        h1_m = F.relu(x_m @ W1.T)
        h2_m = F.relu(h1_m @ W2.T)
        e_m = (h2_m @ W3.T).softmax(1) - F.one_hot(y, C)
        paper = [(h1 - h1_m).T @ x_m / B, (h2 - h2_m).T @ h1_m / B, e_m.T @ h2_m / B]
    torch.testing.assert_close(credits[0], h1 - h1_m)  # a_l = h_l − h_l^m
    torch.testing.assert_close(credits[1], h2 - h2_m)
    return [W1.grad, W2.grad, W3.grad], paper


def test_pepita_matches_the_papers_update_on_a_two_hidden_layer_mlp():
    ours, paper = _pepita_updates(0.05)  # the paper's F
    small_ours, small_paper = _pepita_updates(0.005)  # the same F, ten times smaller
    for name, g, p, g_s, p_s in zip(
        ("W1", "W2", "head"), ours, paper, small_ours, small_paper, strict=True
    ):
        rel = ((g - p).norm() / p.norm()).item()
        rel_small = ((g_s - p_s).norm() / p_s.norm()).item()
        assert rel < 0.1 and _cos(g[None], p[None]).item() > 0.99, (name, rel)
        # the remainder (presynaptic activity of the clean pass, ReLU mask, readout at the clean pass) is
        # one order higher in F than the update: ten times smaller F, a relative difference ≥ 5× smaller
        assert rel_small < rel / 5, (name, rel, rel_small)


def test_pepita_modulates_the_input_by_the_projected_error_and_keeps_batchnorm_still():
    cfg, shape = SMALL_ARCHS["smallcnn"]
    model = build_model("smallcnn", cfg, shape, 5)
    rule = _rule("pepita", model, shape)
    x, y = torch.randn(8, *shape), torch.randint(0, 5, (8,))
    reference = copy.deepcopy(model)
    reference.run(x)  # one forward pass moves BatchNorm's running statistics once
    fwd, credits = _credits(rule, model, x, y)  # the trainer's pass, then the rule's second one
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), reference.buffers(), strict=True))
    assert rule.F.shape == (math.prod(shape), 5) and rule.F.abs().max() <= 0.05 * math.sqrt(
        6 / math.prod(shape)
    )
    with torch.no_grad():
        e = fwd.logits.softmax(1) - F.one_hot(y, 5)
        modulated = model.run(x + (e @ rule.F.T).view_as(x))
    for a, h, h_m in zip(credits, fwd.hs, modulated.hs, strict=True):
        torch.testing.assert_close(a, h.detach() - h_m)
    assert 0 < rule.reported()["mod_ratio"] < 0.1


# ---------------------------------------------------------------------------------------------
# dtp: with exact inverses, the targets go down the gradient
# ---------------------------------------------------------------------------------------------
class ExactInverse(nn.Module):
    """The analytic inverse of a tanh layer h = tanh(W u + b): u = W⁻¹(atanh h − b)."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.layer = layer

    def forward(self, h):
        return torch.linalg.solve(self.layer.weight, (torch.atanh(h) - self.layer.bias).T).T

    def difference(self, h, delta):
        return self(h + delta) - self(h)


def test_dtp_with_exact_inverses_targets_the_negative_gradient():
    """An MLP whose blocks are orthogonal tanh layers in their near-linear range (so J⁻¹ ∝ Jᵀ), with
    the inverses set to the exact analytic ones: for the default small output step η̂ the target
    direction τ_l − h_l = −η̂ a_l agrees with −g_l at every layer."""
    torch.manual_seed(0)
    model = build_model("mlp", ModelConfig(d=16, L=2, activation="tanh"), (20,), 5)
    with torch.no_grad():
        model.embed[1].bias.zero_()
        for block in model.blocks:
            q, _ = torch.linalg.qr(torch.randn(16, 16))
            block.branch[0].weight.copy_(q)
            block.branch[0].bias.zero_()
    rule = _rule("dtp", model, (20,))
    rule.net = nn.ModuleList(ExactInverse(b.branch[0]) for b in model.blocks)
    x, y = 0.1 * torch.randn(32, 20), torch.randint(0, 5, (32,))
    _, credits = _credits(rule, model, x, y)
    _, gs = true_grads(model, x, y)
    torch.testing.assert_close(credits[-1], gs[-1])  # τ_L = h_L − η̂ g_L: a_L = g_L exactly
    for l, (a, g) in enumerate(zip(credits, gs, strict=True)):
        direction = -rule.opts.target_step * a  # τ_l − h_l
        assert _cos(direction, -g).min() >= 0.99, f"layer {l}: cos {_cos(direction, -g).min():.4f}"


def test_dtp_inverses_learn_to_reconstruct(arch):
    cfg, shape = SMALL_ARCHS[arch]
    model = build_model(arch, cfg, shape, 5)
    rule = _rule("dtp", model, shape)
    x, y = torch.randn(32, *shape), torch.randint(0, 5, (32,))
    fwd = model.run(x, detach_inputs=True)
    losses = [rule.step(model, x, y, fwd)["rec_loss"].item() for _ in range(40)]
    assert losses[-1] < 0.7 * losses[0], losses[::10]


# ---------------------------------------------------------------------------------------------
# fwdgrad: the formula exactly, unbiasedness, and Γ per direction
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fwdgrad_credit_is_the_directional_derivative_times_the_direction(arch, mode):
    """a_l = (g_l·v) v with the rule's own v (redrawn here from its seed and step); where BatchNorm
    couples the samples (smallcnn in training mode), a_l,i = (Σ_j g_l,j·v_j) v_i."""
    cfg, shape = SMALL_ARCHS[arch]
    model = build_model(arch, cfg, shape, 5).train(mode == "train")
    rule = _rule("fwdgrad", model, shape)
    rule.steps = 3
    x, y = torch.randn(6, *shape), torch.randint(0, 5, (6,))
    _, credits = _credits(rule, model, x, y)
    _, gs = true_grads(model, x, y)
    gen = torch.Generator().manual_seed(_stream_seed(rule.seed, 3))
    coupled = []
    for l, (a, g) in enumerate(zip(credits, gs, strict=True)):
        v = torch.randn((1, *g.shape), generator=gen)[0]
        coupled.append(couples_samples(model, l))
        gv = (g * v).flatten(1).sum(1)  # (B,)
        scalar = gv.sum().expand_as(gv) if coupled[-1] else gv
        torch.testing.assert_close(
            a, scalar.view(-1, *[1] * (v.dim() - 1)) * v, rtol=1e-4, atol=1e-6
        )
    assert any(coupled) == (arch.startswith("smallcnn") and mode == "train")


def test_fwdgrad_is_unbiased():
    """The mean over 4096 directions converges to g_l: E‖a − g‖² = (D+1)‖g‖²/K, cos ≈ 0.998 at D = 16."""
    cfg, shape = SMALL_ARCHS["resmlp"]
    model = build_model("resmlp", cfg, shape, 5)
    rule = _rule("fwdgrad", model, shape, directions=4096)
    x, y = torch.randn(8, *shape), torch.randint(0, 5, (8,))
    _, credits = _credits(rule, model, x, y)
    _, gs = true_grads(model, x, y)
    for l, (a, g) in enumerate(zip(credits, gs, strict=True)):
        assert _cos(a, g).min() >= 0.99, f"layer {l}: cos {_cos(a, g).min():.4f}"


@pytest.mark.parametrize("arch_name", ["resmlp", "vit_mini", "smallcnn"])
def test_fwdgrad_gamma_per_direction_is_the_analytic_one(arch_name):
    """cos(a_l, g_l) = |cos(v, g_l)| for one Gaussian direction: mean Γ(D/2)/(√π Γ((D+1)/2)) for a
    state of D features (0.20 at D = 16, 0.09 at 80), over 4096 samples, within 5 standard errors."""
    cfg, shape = SMALL_ARCHS[arch_name]
    model = build_model(arch_name, cfg, shape, 5).eval()  # eval: the samples are independent
    rule = _rule("fwdgrad", model, shape)
    x, y = torch.randn(4096, *shape), torch.randint(0, 5, (4096,))
    _, credits = _credits(rule, model, x, y)
    _, gs = true_grads(model, x, y)
    for l, (a, g) in enumerate(zip(credits, gs, strict=True)):
        D = a[0].numel()
        expected = math.exp(math.lgamma(D / 2) - math.lgamma((D + 1) / 2)) / math.sqrt(math.pi)
        c = _cos(a, g)
        assert abs(c.mean().item() - expected) <= 5 * c.std().item() / math.sqrt(len(c)), (
            l,
            D,
            c.mean().item(),
            expected,
        )


def test_fwdgrad_directions_are_fresh_each_step_and_not_consumed_by_a_probe():
    cfg, shape = SMALL_ARCHS["resmlp"]
    model = build_model("resmlp", cfg, shape, 5)
    rule = _rule("fwdgrad", model, shape)
    x, y = torch.randn(6, *shape), torch.randint(0, 5, (6,))
    fwd, first = _credits(rule, model, x, y)
    _, probe = _credits(rule, model, x, y)  # a diagnostic between two steps: the same draw
    assert all(torch.equal(a, b) for a, b in zip(first, probe, strict=True))
    rule.step(model, x, y, fwd)
    _, second = _credits(rule, model, x, y)
    assert not any(torch.equal(a, b) for a, b in zip(first, second, strict=True))


# ---------------------------------------------------------------------------------------------
# all four: a run resumed from a checkpoint continues exactly
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", RULES_HERE)
def test_resumed_from_a_checkpoint_the_run_continues_exactly(tmp_path, rule):
    cfg = tiny_config(tmp_path, f"rule={rule}", "d=16", "L=2", "batch_size=32")
    straight = build_run(cfg)
    batches = list(straight.loader.epoch(0))[:4]
    for x, y in batches:
        train_step(straight, x, y)
    first = build_run(cfg)
    for x, y in batches[:2]:
        train_step(first, x, y)
    save_checkpoint(tmp_path / "ckpt.safetensors", run_state(first), run_meta(first))
    resumed = build_run(cfg)
    restore(resumed, *load_checkpoint(tmp_path / "ckpt.safetensors"))
    for x, y in batches[2:]:
        train_step(resumed, x, y)
    for (name, p), q in zip(
        straight.model.named_parameters(), resumed.model.parameters(), strict=True
    ):
        assert torch.equal(p, q), f"{rule}: {name} differs after resuming"
