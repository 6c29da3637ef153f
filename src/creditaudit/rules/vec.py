"""``vec`` — a learned vector field of credits ("Vec_M4" in the exploitability memo), trained on
finite differences of the true loss along random directions.

Credit:   a_l = a_φ(h_l, τ(l), s) = W_l z_l / rms(h_l),  z_l the trunk features of
          (LN(h_l), τ(l), s) (``_estimator.Estimator``), reshaped to the shape of h_l, l = 0..L.
          W_l is a per-layer output adapter Linear(width, D_l). Dividing by the per-sample RMS of
          h_l gives the credit the 1/‖h‖ scale of a gradient behind a normalisation (terminal LN,
          BatchNorm of the next conv stage) without having to learn it.
Training: after each model step, on the detached states of the batch: M random unit directions
          v_j per sample (Gaussian, normalised over the flattened state; the rule's own generator),
          a step δ_i = eps·‖h_l,i‖ (relative, so the probe is 1% of the state whatever its scale),
          and the central difference of the true per-sample loss of the CURRENT model run from
          the perturbed state (blocks l+1..L, norm, head; ``_estimator.forward_from``, no grad):
              t_ij = [CE_i(h_l,i + δ_i v_ij) − CE_i(h_l,i − δ_i v_ij)] / (2 δ_i)   ≈ ⟨g_l,i, v_ij⟩
          (all 2M perturbed copies of the batch run as one batch: BatchNorm in training mode sees
          the statistics of all of them, ≈ those of the clean batch, and none is updated).
          Loss per layer: the normalised squared error of the projections p_ij = ⟨a_l,i, v_ij⟩,
              nse_l = mean_i Σ_j (p_ij − t_ij)² / (Σ_j t_ij² + 1e-3·mean_k Σ_j t_kj² + tiny)
          (normalised per sample, with a floor relative to the batch so that a sample whose loss
          is flat does not dominate), averaged over l = 0..L; plus, with ``terminal=true``, the
          direct match at l = L to g_L (the current readout's true per-sample gradient):
              nse_T = mean_i ‖a_L,i − g_L,i‖² / (‖g_L,i‖² + 1e-3·mean_k ‖g_L,k‖² + tiny).
          loss = mean of those terms; one AdamW step (own optimizer, ``est_lr``).
Defaults: est_lr 1e-3, width 128, depth 1, code=error, M 4, eps 1e-2 (relative), terminal true.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from creditaudit.models.base import CreditNet, Forward
from creditaudit.rules import _estimator as E
from creditaudit.rules.base import RULES


@dataclass
class VecOptions(E.EstimatorOptions):
    M: int = field(default=4, metadata={"help": "random unit directions per sample and layer for the central differences"})
    eps: float = field(default=1e-2, metadata={"help": "finite-difference step, relative: δ = eps·‖h_l‖ per sample"})
    terminal: bool = field(default=True, metadata={"help": "also match a_L to the true g_L directly (normalised squared error)"})


@RULES.register("vec", "learned vector field a(h_l, τ(l), e_T) fit to central differences of the loss along M=4 random directions (Vec_M4)")
class VectorField(E.EstimatorRule):
    Options = VecOptions
    name = "vec"

    def setup(self, model: CreditNet, ctx) -> None:
        super().setup(model, ctx)
        E.check_positive(self.name, "M", self.opts.M)
        E.check_positive(self.name, "eps", self.opts.eps)

    def build(self, shapes: list[tuple[int, ...]]) -> nn.Module:
        dims = [int(torch.Size(s).numel()) for s in shapes]
        return nn.ModuleDict({
            "trunk": E.Estimator(dims, self.ctx.num_classes, self.opts.width, self.opts.depth),
            "out": nn.ModuleList(nn.Linear(self.opts.width, D) for D in dims),
        })

    def vector_field(self, hs: list[Tensor], s: Tensor) -> list[Tensor]:
        """a_l for every state h_0..h_L: (B, D_l) each, float32."""
        zs = self.net["trunk"].features(hs, list(range(len(hs))), s)
        return [self.net["out"][l](z) / E.rms(h.float())[:, None] for l, (z, h) in enumerate(zip(zs, hs))]

    # ---- Rule interface -----------------------------------------------------------------------
    def credits(self, model: CreditNet, x: Tensor, y: Tensor, fwd: Forward) -> list[Tensor]:
        self.ready(fwd.hs)
        s = E.terminal_code(self.opts.code, fwd.logits, y)
        with torch.no_grad():
            return [a.view_as(h).to(h.dtype) for a, h in zip(self.vector_field(fwd.hs, s), fwd.hs)]

    def step(self, model: CreditNet, x: Tensor, y: Tensor, fwd: Forward) -> dict[str, Tensor]:
        self.ready(fwd.hs)
        o = self.opts
        hs = [h.detach() for h in fwd.hs]
        L, B = len(hs) - 1, y.shape[0]
        s = E.terminal_code(o.code, fwd.logits, y)
        preds = self.vector_field(hs, s)

        terms = []
        for l, (h, a) in enumerate(zip(hs, preds)):
            flat = h.flatten(1)  # (B, D)
            v = torch.randn((o.M, *flat.shape), generator=self.gen, device=h.device)
            v = v / v.norm(dim=2, keepdim=True)  # (M, B, D) unit directions
            delta = o.eps * flat.float().norm(dim=1).clamp_min(1e-12)  # (B,)
            step = (delta[:, None] * v).to(h.dtype)
            rows = torch.cat([flat + step, flat - step]).view(2 * o.M * B, *h.shape[1:])
            with torch.no_grad():
                ce = F.cross_entropy(E.forward_from(model, l, rows), y.repeat(2 * o.M), reduction="none")
            ce = ce.float().view(2, o.M, B)
            t = ((ce[0] - ce[1]) / (2 * delta)).T  # (B, M) ≈ ⟨g_l, v_j⟩
            p = torch.einsum("bd,mbd->bm", a, v)  # (B, M)
            terms.append(E.normalised_sq_error(p, t))
        fd = torch.stack(terms).mean()
        out = {"fd_nse": fd.detach()}
        if o.terminal:
            _, g = E.terminal_loss_and_grad(model, fwd.hs[L], y)
            term = E.normalised_sq_error(preds[L], g.flatten(1).float())
            terms.append(term)
            out["terminal_nse"] = term.detach()
            out["terminal_cos"] = E.per_sample_cosine(preds[L].detach(), g.float()).mean()
        loss = torch.stack(terms).mean()
        self.train_on(loss)
        out["loss"] = loss.detach()
        return out
