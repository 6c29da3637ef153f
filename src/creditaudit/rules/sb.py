"""``sb`` — State Bridge: a learned map from any state h_l to the last state h_L, and credit as the
gradient of the true readout's loss through it (a target-prop-style probe).

Bridge:   ĥ_L = G_ψ(LN h_l, τ(l), s) = W_out z_l,   z_l = MLP(A_l(LN h_l) + τ(l) + W_s s)
          the trunk features (``_estimator.Estimator``), reshaped to the shape of h_L. G sees the
          state only through LN(h_l), so ĥ_L does not change when h_l is multiplied by a constant
          and the credit scales like 1/‖h_l‖. ``rms_out=true`` multiplies the output by rms(h_l)
          (the per-sample RMS of the state, which the LN took out of the input): ĥ_L then follows
          the scale of the stream instead of learning it in W_out, which changes the credit where
          the readout is not scale-free (no terminal norm, e.g. smallcnn).
Credit:   a_l = ∇_{h_l} CE(H(N(G_ψ(h_l, τ(l), s))), y)   per sample (gradient of the summed CE),
          through the CURRENT model's terminal norm N and head H, for l = 0..L. At l = L the bridge
          is used too (G ≈ identity there); ``exact_terminal=true`` gives a_L = g_L instead.
Training: after each model step, on the detached states of the batch, one AdamW step of the
          bridge (its own optimizer, ``est_lr``) on the normalised regression onto sg(h_L),
              loss = mean_{l=0..L} mean_i ‖G_ψ(h_l,i) − h_L,i‖² / (‖h_L,i‖² + 1e-12)
          (normalised per sample, so a growing ‖h_L‖ does not blow the loss up).
Defaults: est_lr 1e-3, width 128, depth 1, code=error (s = e_T = softmax(o) − onehot(y)),
          exact_terminal false, rms_out false.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from creditaudit.models.base import CreditNet, Forward
from creditaudit.rules import _estimator as estimator
from creditaudit.rules.base import RULES


@dataclass
class SBOptions(estimator.EstimatorOptions):
    """Options of ``sb`` (the estimator's own, then the bridge's)."""

    exact_terminal: bool = field(
        default=False,
        metadata={
            "help": "a_L = g_L exactly (through the current head and norm) instead of through the bridge"
        },
    )
    rms_out: bool = field(
        default=False,
        metadata={
            "help": (
                "multiply the bridge output by rms(h_l), so that ĥ_L follows the scale of the "
                "stream (default: G sees LN(h_l) only)"
            )
        },
    )


class BridgeNet(nn.Module):
    """G_ψ: the conditioned trunk with the code s at its input, and W_out (width -> D_L)."""

    def __init__(self, dims: list[int], width: int, depth: int, num_classes: int):
        super().__init__()
        self.trunk = estimator.Estimator(dims, width, depth, code_dim=num_classes)
        self.out = nn.Linear(width, dims[-1])


@RULES.register("sb", "State Bridge: learned G(h_l, τ(l), e_T) ≈ h_L; a_l = ∇_{h_l} CE(H(N(G)))")
class StateBridge(estimator.EstimatorRule[SBOptions, BridgeNet]):
    Options = SBOptions

    def build(self, shapes: list[tuple[int, ...]]) -> BridgeNet:
        dims = [int(torch.Size(s).numel()) for s in shapes]
        return BridgeNet(dims, self.opts.width, self.opts.depth, self.ctx.num_classes)

    def bridge(self, hs: list[Tensor], layers: list[int], s: Tensor) -> list[Tensor]:
        """ĥ_L for each state hs[i] of block index layers[i]: (B, *shape of h_L), float32."""
        net = self.built()
        zs = net.trunk.features(hs, layers, s)
        outs = [net.out(z) for z in zs]  # (B, D_L) each
        if self.opts.rms_out:
            outs = [u * estimator.rms(h.float())[:, None] for u, h in zip(outs, hs, strict=True)]
        return [u.view(-1, *self.shapes[-1]) for u in outs]

    def credits(self, model: CreditNet, x: Tensor, y: Tensor, fwd: Forward) -> list[Tensor]:
        self.ready(fwd.hs)
        L = len(fwd.hs) - 1
        s = estimator.terminal_code(self.opts.code, fwd.logits, y)
        layers = list(range(L)) if self.opts.exact_terminal else list(range(L + 1))
        credits: list[Tensor] = []
        if layers:
            with torch.enable_grad():
                hs = [fwd.hs[l].detach().requires_grad_(True) for l in layers]
                preds = torch.cat(self.bridge(hs, layers, s)).to(
                    fwd.hs[-1].dtype
                )  # every ĥ_L as one batch
                ce = F.cross_entropy(model.readout(preds), y.repeat(len(layers)), reduction="sum")
                credits = [
                    g.detach() for g in torch.autograd.grad(ce, hs)
                ]  # states only: no parameter .grad
        if self.opts.exact_terminal:
            credits.append(estimator.terminal_loss_and_grad(model, fwd.hs[L], y)[1])
        return credits

    def step(self, model: CreditNet, x: Tensor, y: Tensor, fwd: Forward) -> dict[str, Tensor]:
        self.ready(fwd.hs)
        hs = [h.detach() for h in fwd.hs]
        s = estimator.terminal_code(self.opts.code, fwd.logits, y)
        target = hs[-1].float().flatten(1)  # (B, D_L)
        denom = target.pow(2).sum(1) + 1e-12  # (B,)
        preds = self.bridge(hs, list(range(len(hs))), s)
        per_layer = torch.stack(
            [((p.flatten(1) - target).pow(2).sum(1) / denom).mean() for p in preds]
        )
        loss = per_layer.mean()
        self.train_on(loss)
        return {"loss": loss.detach(), "loss_h0": per_layer[0].detach()}
