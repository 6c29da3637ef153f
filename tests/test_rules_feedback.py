"""The feedback-alignment rules ``dfa``, ``fa`` and ``fa_layerwise``: one real local step on every
architecture (and the ``_frozen`` variant), the credit formulas pinned by hand, ``fa_layerwise`` with
B = W equal to BP, feedback matrices reproducible from the run seed alone, checkpoints, and
seed-for-seed identical tiny runs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from creditaudit.errors import ConfigError
from creditaudit.models import ModelConfig, build_model, true_grads
from creditaudit.models.base import Forward
from creditaudit.rules import RuleContext, build_rule, rule_options
from creditaudit.rules.fa import apply_map
from creditaudit.rules.fa_layerwise import FALayerwise, fa_forward
from creditaudit.runs.checkpoint import load_checkpoint, save_checkpoint
from creditaudit.training.objective import LocalUpdate, local_objective
from creditaudit.training.run import build_run
from creditaudit.training.trainer import train
from tests.conftest import SMALL_ARCHS, run_metrics, tiny_config

FEEDBACK_RULES = ("dfa", "fa", "fa_layerwise")


def _cfg(tmp_path, rule: str, arch: str, *overrides: str):
    cfg = tiny_config(tmp_path, f"rule={rule}", f"arch={arch}", *overrides)
    cfg.model = dataclasses.replace(SMALL_ARCHS[arch][0])
    return cfg


def _ctx(model, input_shape: tuple[int, ...], seed: int = 0) -> RuleContext:
    state_shapes, norm_shape = model.shapes(input_shape)
    return RuleContext(
        device=torch.device("cpu"),
        num_classes=model.num_classes,
        steps_per_epoch=1,
        total_steps=1,
        seed=seed,
        state_shapes=tuple(state_shapes),
        norm_shape=norm_shape,
    )


def _batch(run, epoch: int = 0):
    return next(iter(run.loader.epoch(epoch)))


def _credits(rule, model, x, y):
    with rule.local_forward(model):
        fwd = model.run(x, detach_inputs=True)
        return fwd, rule.credits(model, x, y, fwd)


def _tensors(state) -> list[torch.Tensor]:
    """Every tensor of a (nested) rule state, in order."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for k in sorted(state) for t in _tensors(state[k])]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in _tensors(v)]
    return []


def _same(a, b) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return len(ta) == len(tb) and all(
        x.shape == y.shape and torch.equal(x.cpu(), y.cpu()) for x, y in zip(ta, tb, strict=True)
    )


def _materialized(run, epoch: int = 0) -> dict:
    x, y = _batch(run, epoch)
    _credits(
        run.rule, run.model, x, y
    )  # (the matrices are drawn in setup; a batch must not change them)
    return run.rule.state_dict()


# ---------------------------------------------------------------------------------------------
# dfa: the formula by hand
# ---------------------------------------------------------------------------------------------
def _hand_forward(shapes):
    """o = (0, ln 3), y = 0: softmax = (1/4, 3/4), e_T = (-3/4, 3/4)."""
    logits = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    hs = [torch.zeros(1, *s, dtype=torch.float64) for s in shapes]
    return Forward(logits, hs, hs[1:]), torch.tensor([0])


def test_dfa_credit_by_hand():
    model = build_model("mlp", ModelConfig(d=2, L=1), (2,), 2)
    rule, _ = build_rule("dfa")
    rule.setup(model, _ctx(model, (2,)))
    B0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    B1 = torch.tensor([[2.0, 0.0], [0.0, -1.0]])
    rule.load_state_dict({"seed": 0, "B": [B0, B1]})
    fwd, y = _hand_forward([(2,), (2,)])
    a0, a1 = rule.credits(model, None, y, fwd)
    torch.testing.assert_close(
        a0, torch.tensor([[0.75, 0.75]], dtype=torch.float64)
    )  # (1·-3/4 + 2·3/4, 3·-3/4 + 4·3/4)
    torch.testing.assert_close(a1, torch.tensor([[-1.5, -0.75]], dtype=torch.float64))
    # token-shaped states: B_l e_T is reshaped to (T, d)
    fwd, y = _hand_forward([(2, 1), (1, 2)])
    a0, a1 = rule.credits(model, None, y, fwd)
    torch.testing.assert_close(a0, torch.tensor([[[0.75], [0.75]]], dtype=torch.float64))
    torch.testing.assert_close(a1, torch.tensor([[[-1.5, -0.75]]], dtype=torch.float64))


def test_dfa_credit_is_the_projected_output_error(arch):
    cfg, shape = SMALL_ARCHS[arch]
    model = build_model(arch, cfg, shape, 5).double()
    rule, _ = build_rule("dfa")
    rule.setup(model, _ctx(model, shape))
    x, y = torch.randn(6, *shape, dtype=torch.float64), torch.randint(0, 5, (6,))
    fwd, credits = _credits(rule, model, x, y)
    p = fwd.logits.exp() / fwd.logits.exp().sum(1, keepdim=True)
    e = p - torch.eye(5, dtype=torch.float64)[y]
    for l, (a, B) in enumerate(zip(credits, rule.B, strict=True)):
        torch.testing.assert_close(a.flatten(1), e @ B.double().T, msg=f"a_{l}")


# ---------------------------------------------------------------------------------------------
# fa: the recursion by hand, the norm's true Jacobian, the token structure
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("identity", [False, True])
def test_fa_recursion_by_hand(identity):
    model = build_model("resmlp", ModelConfig(d=2, L=2, out_ln=False), (2,), 2)
    rule, _ = build_rule("fa", {"identity": identity})
    rule.setup(model, _ctx(model, (2,)))
    B_H = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    B_1 = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    B_2 = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    rule.load_state_dict({"seed": 0, "head": [B_H], "blocks": [[B_1], [B_2]]})
    fwd, y = _hand_forward([(2,), (2,), (2,)])
    a0, a1, a2 = (a.squeeze(0).tolist() for a in rule.credits(model, None, y, fwd))
    assert a2 == [-0.75, 1.5]  # B_H e_T, identity terminal norm
    if not identity:
        assert a1 == [1.5, -0.75]  # B_2 a_2
        assert a0 == [0.75, -0.75]  # B_1 a_1
    else:
        assert a1 == [0.75, 0.75]  # a_2 + B_2 a_2
        assert a0 == [2.25, 1.5]  # a_1 + B_1 a_1


def _fa_with_head_transpose(model, x, y):
    rule, _ = build_rule("fa")
    rule.setup(model, _ctx(model, tuple(x.shape[1:])))
    _credits(rule, model, x, y)  # draw the matrices, then put the head's transpose in place of B_H
    state = rule.state_dict()
    state["head"] = [model.head.weight.detach().T.clone()]
    rule.load_state_dict(state)
    return rule


def test_fa_top_credit_goes_through_the_true_norm_jacobian(arch):
    """With B_H = W_Hᵀ, a_L = J_Nᵀ W_Hᵀ e_T is exactly g_L — through LayerNorm, vit's cls LN, identity."""
    cfg, shape = SMALL_ARCHS[arch]
    model = build_model(arch, cfg, shape, 5).double()
    x, y = torch.randn(6, *shape, dtype=torch.float64), torch.randint(0, 5, (6,))
    rule = _fa_with_head_transpose(model, x, y)
    _, gs = true_grads(model, x, y)
    _, credits = _credits(rule, model, x, y)
    torch.testing.assert_close(credits[-1], gs[-1], rtol=1e-9, atol=1e-12)


def test_fa_block_maps_per_architecture():
    # vit_mini: token states (T, d) get a T×T ⊗ d×d map and credit reaches every token
    cfg, shape = SMALL_ARCHS["vit_mini"]
    model = build_model("vit_mini", cfg, shape, 5)
    x, y = torch.randn(4, *shape), torch.randint(0, 5, (4,))
    rule, _ = build_rule("fa")
    rule.setup(model, _ctx(model, shape))
    fwd, credits = _credits(rule, model, x, y)
    T, d = fwd.hs[0].shape[1:]
    assert [tuple(f.shape) for f in rule.blocks[0]] == [(T, T), (d, d)]
    assert credits[-1][:, 1:].abs().sum() == 0  # the terminal LN sees the cls token only
    assert (credits[-2].abs().sum(2) > 0).all()  # B_L spreads it to every token
    M, D = rule.blocks[-1]
    dense = torch.kron(M, D)  # the same map on the flattened (T·d) state
    torch.testing.assert_close(apply_map([dense], credits[-1], (T, d)), credits[-2])
    # structure=dense: one (T·d)² matrix instead
    rule, _ = build_rule("fa", {"structure": "dense"})
    rule.setup(model, _ctx(model, shape))
    _credits(rule, model, x, y)
    assert [tuple(f.shape) for f in rule.blocks[0]] == [(T * d, T * d)]
    # smallcnn: the states change shape, so each map is one dense flat(h_l) -> flat(h_{l-1}) matrix
    cfg, shape = SMALL_ARCHS["smallcnn"]
    model = build_model("smallcnn", cfg, shape, 5)
    rule, _ = build_rule("fa")
    rule.setup(model, _ctx(model, shape))
    fwd, _ = _credits(rule, model, torch.randn(4, *shape), torch.randint(0, 5, (4,)))
    n = [h[0].numel() for h in fwd.hs]
    assert [[tuple(f.shape) for f in fs] for fs in rule.blocks] == [
        [(n[l - 1], n[l])] for l in range(1, 4)
    ]


def test_fa_default_scale_keeps_credit_norms_about_constant():
    """N(0, 1/d) maps: E‖B a‖² = ‖a‖² — the documented default scale."""
    model = build_model("resmlp", ModelConfig(d=256, L=4), (8,), 10)
    rule, _ = build_rule("fa")
    rule.setup(model, _ctx(model, (8,)))
    _, credits = _credits(rule, model, torch.randn(64, 8), torch.randint(0, 10, (64,)))
    norms = torch.stack([a.norm(dim=1).median() for a in credits])
    assert (norms / norms[-1]).sub(1).abs().max() < 0.3, norms


# ---------------------------------------------------------------------------------------------
# fa_layerwise: the layers, and B = W reproduces BP
# ---------------------------------------------------------------------------------------------
def _layer_grads(m, x, dy, B):
    """(dx, dW, db) of ``fa_forward`` with feedback B, and the exact ones of the plain layer."""
    out = []
    for fa in (True, False):
        xi = x.clone().requires_grad_(True)
        m.zero_grad(set_to_none=True)
        y = fa_forward(m, xi, B, detach_weights=False) if fa else m(xi)
        y.backward(dy)
        out.append((xi.grad, m.weight.grad.clone(), m.bias.grad.clone()))
    return out


def test_fa_layers_use_feedback_for_the_input_and_exact_weight_gradients():
    torch.set_default_dtype(torch.float64)
    try:
        lin = nn.Linear(5, 3)
        x, dy, B = torch.randn(4, 2, 5), torch.randn(4, 2, 3), torch.randn(3, 5)
        (dx, dw, db), (_, dw_ref, db_ref) = _layer_grads(lin, x, dy, B)
        torch.testing.assert_close(dx, dy @ B)
        torch.testing.assert_close(dw, dw_ref)
        torch.testing.assert_close(db, db_ref)
        for conv in (
            nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2),
            nn.Conv2d(4, 6, 3, padding="same", padding_mode="reflect"),
            nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2),
            nn.Conv1d(4, 6, 3, padding="same", padding_mode="reflect"),
        ):
            x = torch.randn(2, 4, *(7,) * len(conv.kernel_size))
            dy = torch.randn_like(conv(x))
            B = torch.randn_like(conv.weight)
            (dx, dw, db), (_, dw_ref, db_ref) = _layer_grads(conv, x, dy, B)
            # reference: the input gradient of the same convolution with B as its weight
            xi = x.clone().requires_grad_(True)
            conv_b = type(conv)(
                4,
                6,
                3,
                stride=conv.stride,
                padding=conv.padding,
                groups=conv.groups,
                padding_mode=conv.padding_mode,
                bias=False,
            )
            conv_b.weight.data.copy_(B)
            conv_b(xi).backward(dy)
            torch.testing.assert_close(dx, xi.grad)
            torch.testing.assert_close(dw, dw_ref)
            torch.testing.assert_close(db, db_ref)
    finally:
        torch.set_default_dtype(torch.float32)


def _grads(model):
    return {
        n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in model.named_parameters()
    }


def _local_step_grads(rule, model, x, y):
    model.zero_grad(set_to_none=True)
    with rule.local_forward(model):
        fwd = model.run(x, detach_inputs=True)
        credits = rule.credits(model, x, y, fwd)
        (
            F.cross_entropy(fwd.logits, y)
            + local_objective(fwd, credits, rule=LocalUpdate("inner"), lam=0.0, train_blocks=True)
        ).backward()
    return credits, _grads(model)


def test_fa_layerwise_with_feedback_equal_to_weights_is_bp(arch):
    cfg, shape = SMALL_ARCHS[arch]
    model = build_model(arch, cfg, shape, 5).double()
    x, y = torch.randn(6, *shape, dtype=torch.float64), torch.randint(0, 5, (6,))
    rule = FALayerwise()
    rule.setup(model, _ctx(model, shape))
    rule.align_to_weights(model)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    reference = _grads(model)
    _, gs = true_grads(model, x, y)

    credits, local = _local_step_grads(rule, model, x, y)
    for l, (a, g) in enumerate(zip(credits, gs, strict=True)):
        torch.testing.assert_close(a, g, rtol=1e-9, atol=1e-12, msg=f"{arch}: a_{l}")
    assert set(local) == set(reference)
    for name in reference:
        torch.testing.assert_close(
            local[name], reference[name], rtol=1e-9, atol=1e-12, msg=f"{arch}: {name}"
        )


def test_fa_layerwise_random_feedback_changes_block_updates_not_the_readout():
    cfg, shape = SMALL_ARCHS["resmlp"]
    model = build_model("resmlp", cfg, shape, 5).double()
    x, y = torch.randn(6, *shape, dtype=torch.float64), torch.randint(0, 5, (6,))
    rule = FALayerwise()
    rule.setup(model, _ctx(model, shape))
    assert sorted(rule.feedback) == sorted(
        [f"blocks.{l}.branch.{fc}" for l in range(model.L) for fc in ("fc1", "fc2")] + ["head"]
    )
    _, gs = true_grads(model, x, y)
    credits, local = _local_step_grads(rule, model, x, y)
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    reference = _grads(model)
    for name in reference:
        if name.startswith(("norm.", "head.")):
            torch.testing.assert_close(local[name], reference[name])  # always the exact CE gradient
    assert not torch.allclose(credits[-1], gs[-1])  # a_L = J_Nᵀ B_Hᵀ e_T, not g_L
    assert not torch.allclose(
        local["blocks.0.branch.fc1.weight"], reference["blocks.0.branch.fc1.weight"]
    )


def test_fa_layerwise_feedback_drawn_like_pytorch_default_init():
    model = build_model("resmlp", ModelConfig(d=256, L=1), (64,), 10)
    rule = FALayerwise()
    rule.setup(model, _ctx(model, (64,)))
    B = rule.feedback["blocks.0.branch.fc1"]
    assert B.abs().max() <= 1 / 16 and B.abs().max() > 0.99 / 16  # U(±1/√256)
    assert not torch.equal(B, model.blocks[0].branch.fc1.weight)
    rule = FALayerwise(rule_options("fa_layerwise", {"init": "weights"}))
    rule.setup(model, _ctx(model, (64,)))
    assert torch.equal(rule.feedback["head"], model.head.weight)


def test_fa_layerwise_refuses_layers_it_cannot_patch():
    model = build_model("resmlp", ModelConfig(d=8, L=1), (4,), 3)
    ctx = _ctx(model, (4,))
    model.blocks[0].branch.fc1 = nn.ConvTranspose1d(8, 8, 1)
    with pytest.raises(NotImplementedError, match="ConvTranspose1d"):
        FALayerwise().setup(model, ctx)


# ---------------------------------------------------------------------------------------------
# reproducibility, checkpoints, whole runs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", FEEDBACK_RULES)
def test_feedback_matrices_are_a_function_of_the_seed_alone(tmp_path, rule):
    a = _materialized(build_run(_cfg(tmp_path / "a", rule, "vit_mini", "seed=7")))
    torch.rand(100)  # whatever happened to the global RNG in between does not matter
    # other data order, batch size, learning rate, first batch: same seed -> same matrices
    b = _materialized(
        build_run(_cfg(tmp_path / "b", rule, "vit_mini", "seed=7", "batch_size=32", "lr=0.1")),
        epoch=3,
    )
    c = _materialized(build_run(_cfg(tmp_path / "c", rule, "vit_mini", "seed=8")))
    assert _tensors(a) and _same(a, b)
    assert not any(torch.equal(x, y) for x, y in zip(_tensors(a), _tensors(c), strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rule", FEEDBACK_RULES)
def test_feedback_matrices_do_not_depend_on_the_device(tmp_path, rule):
    on_cpu = _materialized(build_run(_cfg(tmp_path / "a", rule, "smallcnn", "device=cpu")))
    on_gpu = _materialized(build_run(_cfg(tmp_path / "b", rule, "smallcnn", "device=cuda")))
    assert all(t.device.type == "cuda" for t in _tensors(on_gpu))
    assert _same(on_cpu, on_gpu)


@pytest.mark.parametrize("rule", FEEDBACK_RULES)
def test_checkpoint_round_trip_restores_the_matrices(tmp_path, rule):
    run = build_run(_cfg(tmp_path / "a", rule, "smallcnn", "seed=3"))
    fresh_state = run.rule.state_dict()  # dfa/fa: only the seed, before the first batch
    x, y = _batch(run)
    _, credits = _credits(run.rule, run.model, x, y)
    save_checkpoint(
        tmp_path / "ck.safetensors", {"rule": run.rule.state_dict(), "fresh": fresh_state}
    )
    state, _ = load_checkpoint(tmp_path / "ck.safetensors")
    for key in ("rule", "fresh"):
        other = build_run(_cfg(tmp_path / key, rule, "smallcnn", "seed=4"))
        other.model.load_state_dict(run.model.state_dict())
        other.rule.load_state_dict(state[key])
        _, again = _credits(other.rule, other.model, x, y)
        assert _same(other.rule.state_dict(), run.rule.state_dict()), key
        for a, b in zip(credits, again, strict=True):
            assert torch.equal(a, b), key


@pytest.mark.parametrize("rule", FEEDBACK_RULES)
def test_resumed_run_reads_its_feedback_matrices_from_the_checkpoint(tmp_path, rule):
    a = tiny_config(tmp_path / "a", f"rule={rule}", "epochs=2")
    b = tiny_config(tmp_path / "b", f"rule={rule}", "epochs=2")
    train(a)
    assert train(b, stop_after=1)["status"] == "interrupted"
    assert (
        train(b)["resumed_from"] == 1
    )  # the second epoch runs on matrices read from the checkpoint
    assert run_metrics(a) == run_metrics(b)
    assert math.isfinite(run_metrics(a)[-1]["train/loss"])


def test_options_are_checked_and_parsed():
    assert rule_options("fa", {"identity": "true", "structure": "kron"}).identity is True
    assert rule_options("dfa", {"init": "uniform", "scale": "0.5"}).scale == 0.5
    for name, opts in (
        ("dfa", {"init": "gaussian"}),
        ("fa", {"structure": "sparse"}),
        ("fa_layerwise", {"scale": "0"}),
        ("fa", {"scale": "-1"}),
    ):
        with pytest.raises(ConfigError, match=name):
            rule_options(name, opts)
