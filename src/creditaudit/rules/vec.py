"""``vec`` — a learned vector field of credits ("Vec_M4" in the exploitability memo), trained on
finite differences of the true loss along random directions.

Credit:   a_l = a_φ(h_l, τ(l), s) = U_l (z_l ⊙ W_s s) / rms(h_l),  z_l = MLP(A_l(LN h_l) + τ(l))
          the trunk features (``_estimator.Estimator``), W_s = Linear(C, width), U_l a per-layer
          output adapter Linear(width, D_l) (no biases); reshaped to the shape of h_l, l = 0..L.
          Linear in s = e_T, like the true g_l = (∂o/∂h_l)ᵀ e_T: a_l = A_φ(h_l) e_T with a learned
          state-dependent D_l × C matrix of rank ≤ width, which vanishes on samples already fit.
          Dividing by the per-sample RMS of h_l gives the credit the 1/‖h‖ scale of a gradient
          behind a normalisation (terminal LN, BatchNorm of the next conv stage) for free.
Training: after each model step, on the detached states of the batch: M random unit directions
          v_j per sample (Gaussian, normalised over the flattened state; the rule's own generator),
          a step δ_i = eps·‖h_l,i‖ (relative, so the probe is 1% of the state whatever its scale),
          and the central difference of the true per-sample loss of the CURRENT model run from
          the perturbed state (blocks l+1..L, norm, head; ``CreditNet.forward_from``, no grad):
              t_ij = [CE_i(h_l,i + δ_i v_ij) − CE_i(h_l,i − δ_i v_ij)] / (2 δ_i)   ≈ ⟨g_l,i, v_ij⟩
          (all 2M perturbed copies of the batch run as one batch: BatchNorm in training mode sees
          the statistics of all of them, ≈ those of the clean batch, and none is updated).
          Loss per layer: the normalised squared error of the projections p_ij = ⟨a_l,i, v_ij⟩,
              nse_l = mean_i Σ_j (p_ij − t_ij)² / (Σ_j t_ij² + 1e-3·mean_k Σ_j t_kj² + tiny)
          (normalised per sample, with a floor relative to the batch so that a sample whose loss
          is flat does not dominate). Probing layer l costs 2M forward passes of blocks l+1..L,
          so each step probes ``fd_layers`` layers, taken round robin over 0..L (default 1: every
          layer is probed every L+1 steps; 0 probes all of them every step). Plus, with
          ``terminal=true``, the direct match at l = L to g_L (the current readout's true
          per-sample gradient), every step:
              nse_T = mean_i ‖a_L,i − g_L,i‖² / (‖g_L,i‖² + 1e-3·mean_k ‖g_L,k‖² + tiny).
          loss = mean of those terms; one AdamW step (own optimizer, ``est_lr``).
Defaults: est_lr 1e-3, width 128, depth 1, code=error, M 4, eps 1e-2 (relative), fd_layers 1,
          terminal true.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from creditaudit.models.base import CreditNet, Forward
from creditaudit.rules import _estimator as estimator
from creditaudit.rules.base import RULES
from creditaudit.rules.options import check_at_least, check_positive


@dataclass
class VecOptions(estimator.EstimatorOptions):
    """Options of ``vec`` (the estimator's own, then the finite differences')."""

    M: int = field(
        default=4,
        metadata={
            "help": "random unit directions per sample and layer for the central differences"
        },
    )
    eps: float = field(
        default=1e-2,
        metadata={"help": "finite-difference step, relative: δ = eps·‖h_l‖ per sample"},
    )
    terminal: bool = field(
        default=True,
        metadata={"help": "also match a_L to the true g_L directly (normalised squared error)"},
    )
    fd_layers: int = field(
        default=1,
        metadata={
            "help": (
                "layers probed by finite differences per step, taken round robin over 0..L (0 = "
                "all L+1 every step); probing layer l costs 2M forward passes of blocks l+1..L"
            )
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least("M", self.M, 1)
        check_positive("eps", self.eps)
        check_at_least("fd_layers", self.fd_layers, 0, " (0 = all layers)")


class VectorFieldNet(nn.Module):
    """The conditioned trunk (without the code), W_s and the per-layer read-outs U_l."""

    def __init__(self, dims: list[int], width: int, depth: int, num_classes: int):
        super().__init__()
        self.trunk = estimator.Estimator(dims, width, depth)
        self.code = nn.Linear(num_classes, width, bias=False)  # W_s
        self.out = nn.ModuleList(nn.Linear(width, D, bias=False) for D in dims)  # U_l


@RULES.register(
    "vec",
    "learned vector field a(h_l, τ(l), e_T) fit to central differences of the loss along M=4 "
    "random directions (Vec_M4)",
)
class VectorField(estimator.EstimatorRule[VecOptions, VectorFieldNet]):
    Options = VecOptions

    def build(self, shapes: list[tuple[int, ...]]) -> VectorFieldNet:
        dims = [int(torch.Size(s).numel()) for s in shapes]
        return VectorFieldNet(dims, self.opts.width, self.opts.depth, self.ctx.num_classes)

    def vector_field(self, hs: list[Tensor], layers: list[int], s: Tensor) -> list[Tensor]:
        """a_l for each state hs[i] of block index layers[i]: (B, D_l) each, float32."""
        net = self.built()
        zs = net.trunk.features(hs, layers)
        gate = net.code(s)  # (B, width)
        return [
            net.out[l](z * gate) / estimator.rms(h.float())[:, None]
            for l, z, h in zip(layers, zs, hs, strict=True)
        ]

    def fd_targets(self, model: CreditNet, l: int, h: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """t_ij = [CE_i(h_i + δ_i v_ij) − CE_i(h_i − δ_i v_ij)] / (2 δ_i), δ_i = eps·‖h_i‖, for a
        state h_l (B, ...) and unit directions v (M, B, D): (B, M), float32, no grad."""
        M, B = v.shape[0], h.shape[0]
        flat = h.detach().flatten(1)
        delta = self.opts.eps * flat.float().norm(dim=1).clamp_min(1e-12)  # (B,)
        step = (delta[:, None] * v).to(h.dtype)  # (M, B, D)
        rows = torch.cat([flat + step, flat - step]).view(2 * M * B, *h.shape[1:])  # one batch
        with torch.no_grad():
            ce = F.cross_entropy(model.forward_from(l, rows), y.repeat(2 * M), reduction="none")
        ce = ce.float().view(2, M, B)
        return ((ce[0] - ce[1]) / (2 * delta)).T

    # ---- Rule interface -----------------------------------------------------------------------
    def credits(self, model: CreditNet, x: Tensor, y: Tensor, fwd: Forward) -> list[Tensor]:
        self.ready(fwd.hs)
        s = estimator.terminal_code(self.opts.code, fwd.logits, y)
        with torch.no_grad():
            credits = self.vector_field(fwd.hs, list(range(len(fwd.hs))), s)
        return [a.view_as(h).to(h.dtype) for a, h in zip(credits, fwd.hs, strict=True)]

    def step(self, model: CreditNet, x: Tensor, y: Tensor, fwd: Forward) -> dict[str, Tensor]:
        self.ready(fwd.hs)
        o = self.opts
        hs = [h.detach() for h in fwd.hs]
        L = len(hs) - 1
        s = estimator.terminal_code(o.code, fwd.logits, y)
        n = o.fd_layers if 0 < o.fd_layers < L + 1 else L + 1
        probed = [(self.steps * n + j) % (L + 1) for j in range(n)]  # round robin over 0..L
        layers = sorted(set(probed) | ({L} if o.terminal else set()))
        preds = dict(
            zip(layers, self.vector_field([hs[l] for l in layers], layers, s), strict=True)
        )

        terms = []
        for l in probed:
            flat = hs[l].flatten(1)  # (B, D)
            v = torch.randn((o.M, *flat.shape), generator=self.gen, device=flat.device)
            v = v / v.norm(dim=2, keepdim=True)  # (M, B, D) unit directions
            t = self.fd_targets(model, l, hs[l], y, v)  # (B, M)
            p = torch.einsum("bd,mbd->bm", preds[l], v)  # (B, M)
            terms.append(estimator.normalised_sq_error(p, t))
        fd = torch.stack(terms).mean()
        out = {"fd_nse": fd.detach()}
        if o.terminal:
            _, g = estimator.terminal_loss_and_grad(model, fwd.hs[L], y)
            term = estimator.normalised_sq_error(preds[L], g.flatten(1).float())
            terms.append(term)
            out["terminal_nse"] = term.detach()
            out["terminal_cos"] = estimator.per_sample_cosine(preds[L].detach(), g.float()).mean()
        loss = torch.stack(terms).mean()
        self.train_on(loss)
        out["loss"] = loss.detach()
        return out
