"""Every architecture: the shared model shape, states, and its registry entry."""

from __future__ import annotations

import pytest
import torch

from creditaudit.errors import ConfigError
from creditaudit.models import ARCHS, ModelConfig, build_model, true_grads
from creditaudit.registry import UnknownNameError
from tests.conftest import SMALL_ARCHS


def test_every_arch_returns_logits_and_states(arch):
    cfg, shape = SMALL_ARCHS[arch]
    model = build_model(arch, cfg, shape, 7)
    x = torch.randn(5, *shape)
    fwd = model.run(x)
    assert fwd.logits.shape == (5, 7)
    assert len(fwd.hs) == model.L + 1 and len(fwd.fs) == model.L
    assert all(h.shape[0] == 5 for h in fwd.hs)
    torch.testing.assert_close(model(x), fwd.logits)
    torch.testing.assert_close(model.readout(fwd.hs[-1]), fwd.logits)
    for block, h_prev, h, f in zip(model.blocks, fwd.hs[:-1], fwd.hs[1:], fwd.fs, strict=True):
        expected = h_prev + f if block.residual else f
        torch.testing.assert_close(h, expected)


def test_detached_forward_is_local(arch):
    """With detach_inputs, a loss on h_l reaches only block l's parameters."""
    cfg, shape = SMALL_ARCHS[arch]
    model = build_model(arch, cfg, shape, 3)
    fwd = model.run(torch.randn(4, *shape), detach_inputs=True)
    for l in range(1, model.L + 1):
        model.zero_grad(set_to_none=True)
        fwd.hs[l].sum().backward(retain_graph=True)
        touched = {
            ".".join(n.split(".")[:2]) for n, p in model.named_parameters() if p.grad is not None
        }
        assert touched == {f"blocks.{l - 1}"}, (arch, l, touched)


def test_shallow_variant_has_no_blocks(arch):
    cfg, shape = SMALL_ARCHS[arch]
    cfg = ModelConfig(**{**cfg.__dict__, "L": 0})
    model = build_model(arch, cfg, shape, 3)
    fwd = model.run(torch.randn(2, *shape))
    assert model.L == 0 and len(fwd.hs) == 1 and fwd.logits.shape == (2, 3)


def test_true_grads_are_per_sample_gradients(arch):
    cfg, shape = SMALL_ARCHS[arch]
    model = build_model(arch, cfg, shape, 3).double()
    model.eval()  # per-sample independence (BatchNorm in eval mode) for this check
    x = torch.randn(3, *shape, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    _, gs = true_grads(model, x, y)
    _, g_single = true_grads(model, x[1:2], y[1:2])
    for g, g1 in zip(gs, g_single, strict=True):
        torch.testing.assert_close(g[1:2], g1)


def test_resmlp_definition():
    model = build_model("resmlp", ModelConfig(d=64, L=2, w2_std=0.01), (10,), 4)
    w2 = model.blocks[0].branch.fc2
    assert w2.bias.abs().max() == 0
    assert 0.005 < w2.weight.std().item() < 0.015
    assert isinstance(model.norm, torch.nn.LayerNorm)
    assert isinstance(
        build_model("resmlp", ModelConfig(out_ln=False), (10,), 4).norm, torch.nn.Identity
    )
    assert not build_model("resmlp", ModelConfig(residual=False), (10,), 4).blocks[0].residual


def test_vit_terminal_norm_reads_the_cls_token():
    model = build_model("vit_mini", ModelConfig(d=16, L=1, heads=2), (1, 8, 8), 3)
    h = torch.randn(2, 5, 16)
    h2 = h.clone()
    h2[:, 1:] += 100.0  # patch tokens do not reach the readout directly
    torch.testing.assert_close(model.readout(h), model.readout(h2))


@pytest.mark.parametrize("arch_name", ["smallcnn", "vit_mini"])
def test_image_archs_reject_vectors(arch_name):
    with pytest.raises(ConfigError, match="image inputs"):
        build_model(arch_name, ModelConfig(), (40,), 10)


def test_unknown_arch_is_one_clear_error():
    with pytest.raises(UnknownNameError, match="Did you mean 'resmlp'"):
        ARCHS.get("resmpl")


def test_terminal_norm_and_skip_path_flags_work_on_every_arch(arch):
    """out_ln and residual mean the same on every architecture: None takes the architecture's own
    default (declared with its registration), an explicit value is honoured or refused with a clear error."""
    import dataclasses

    cfg, shape = SMALL_ARCHS[arch]
    x = torch.randn(3, *shape)
    default = ARCHS.get(arch).defaults
    for out_ln in (None, True, False):
        model = build_model(arch, dataclasses.replace(cfg, out_ln=out_ln), shape, 4)
        has_ln = any(isinstance(m, torch.nn.LayerNorm) for m in model.norm.modules())
        assert has_ln == (default.out_ln if out_ln is None else out_ln), (arch, out_ln)
        assert model(x).shape == (3, 4)
    for residual in (None, True, False):
        wanted = default.residual if residual is None else residual
        if wanted and arch.startswith("smallcnn"):
            with pytest.raises(ConfigError, match="residual=true is not available"):
                build_model(arch, dataclasses.replace(cfg, residual=residual), shape, 4)
            continue
        model = build_model(arch, dataclasses.replace(cfg, residual=residual), shape, 4)
        assert all(b.residual == wanted for b in model.blocks), (arch, residual)
        fwd = model.run(x)
        for h_prev, h, f in zip(fwd.hs[:-1], fwd.hs[1:], fwd.fs, strict=True):
            torch.testing.assert_close(h, h_prev + f if wanted else f)
