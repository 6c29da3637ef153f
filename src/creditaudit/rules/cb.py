"""``cb`` — Credit Bridge: a learned scalar value of every state, and credit as its input gradient
(a synthetic-gradient-style probe).

Value:    V_φ(h_l, τ(l), s) = ⟨s, P_φ(z_l)⟩ + c_φ(s),   z_l = MLP(A_l(LN h_l) + τ(l)) the trunk
          features (``_estimator.Estimator``), P_φ = Linear(width, C), c_φ a small MLP of s alone;
          s = e_T = softmax(o) − onehot(y) by default. Why this form: at l = L it is exact,
              CE_i = ⟨e_T,i, o_i⟩ + H(p_i)    (H the entropy of p = softmax(o) = e_T + onehot(y)),
          so with P(z_L) = o and c = H, V = CE and ∇_{h_L}V = (∂o/∂h_L)ᵀ e_T = g_L; for l < L, P
          is a learned logit bridge from h_l and ∇V is linear in e_T, like the true g_l. (A value
          net that sees s in its trunk reads the loss off e_T alone and learns nothing about h.)
Credit:   a_l = ∇_{h_l} V_φ(h_l, τ(l), s)   per sample, l = 0..L (through the input LN, so it
          scales like 1/‖h_l‖).
Training: after each model step, on the detached states of the batch, one AdamW step (own
          optimizer, ``est_lr``) on

            bridge consistency, l = 0..L−1:
              T_l,i = softmin_τ { V̄(h_{l+1},i + σ·ξ_k, τ(l+1), s_i) : k = 1..K },
              softmin_τ(v) = −τ·log((1/K)·Σ_k exp(−v_k/τ))   (between the mean and the min),
              loss_cons = mean_{l<L} mean_i (V(h_l,i) − sg T_l,i)²
            with ξ_k ~ N(0, I) from the rule's own generator, drawn in antithetic pairs ±ξ (half
            the random numbers, lower variance), and V̄ an EMA copy of V
            (V̄ ← ema·V̄ + (1 − ema)·V after every step). The noise is absolute (docs/science.md §3: σξ, the
            same per-feature std σ whatever the scale of the stream); ``noise=relative`` uses
            σ·rms(h_{l+1},i)·ξ_k instead (rms the per-sample RMS over features), so that each copy
            moves h by ≈ σ·‖h‖ — on a stream that has grown large, absolute noise of σ = 0.1 is
            a vanishing perturbation and the soft-min tends to the plain value V̄(h_{l+1});
            terminal matching at l = L, with the current head and norm (g_L by autograd through
            ``model.readout``, CE_i the true per-sample loss):
              loss_val  = mean_i (V(h_L,i) − CE_i)²
              loss_grad = mean_i [ 1 − cos(∇V_i, g_L,i) + (log‖∇V_i‖ − log‖g_L,i‖)² ]
            — a direction term and a log-scale term, both per sample and scale-free, so they stay
            well-conditioned when ‖g_L‖ is 1e-6 or smaller (degenerate runs), where a squared
            error normalised by ‖g_L‖² would explode (samples with g_L = 0 are left out);
            loss = loss_cons + terminal_w · (loss_val + loss_grad).
Warm-up:  ``dfa_warmup=true``: for the first ``warmup_frac`` of ctx.total_steps the credits are
          DFA's, a_l = B_lᵀ e_T with fixed B_l (C × D_l, i.i.d. N(0, 1/C), the ``dfa`` rule's
          default scale) drawn from the rule's seed; the value net trains from step 0 all the same.
Defaults: est_lr 1e-3, width 64, depth 1, code=error, K 8, sigma 0.1, noise absolute, temp 0.1,
          ema 0.995, terminal_w 1.0, dfa_warmup false, warmup_frac 0.2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from creditaudit.errors import ConfigError
from creditaudit.models.base import CreditNet, Forward
from creditaudit.rules import _estimator as estimator
from creditaudit.rules._feedback import random_matrix
from creditaudit.rules.base import RULES
from creditaudit.rules.options import (
    check_at_least,
    check_choice,
    check_fraction,
    check_nonnegative,
    check_positive,
)

NOISE = ("absolute", "relative")  # consistency noise σξ, or σ·rms(h_{l+1})·ξ


@dataclass
class CBOptions(estimator.EstimatorOptions):
    """Options of ``cb`` (the estimator's own, then the bridge's)."""

    width: int = field(
        default=64,
        metadata={
            "help": (
                "estimator width: per-layer input adapters Linear(D_l, width) feed a shared "
                "trunk of this width (64: the K noisy target copies make each step K times the "
                "trunk's work)"
            )
        },
    )
    K: int = field(
        default=8, metadata={"help": "noisy copies of h_{l+1} in the soft-min consistency target"}
    )
    sigma: float = field(
        default=0.1,
        metadata={
            "help": (
                "noise std of each copy per feature (absolute; times the per-sample RMS of "
                "h_{l+1} with noise=relative)"
            )
        },
    )
    noise: str = field(
        default="absolute",
        metadata={
            "help": (
                "consistency noise: absolute (sigma·ξ, the definition) | relative "
                "(sigma·rms(h_{l+1})·ξ, follows the scale of the stream)"
            )
        },
    )
    temp: float = field(
        default=0.1,
        metadata={"help": "soft-min temperature (in loss units) over the K noisy target values"},
    )
    ema: float = field(default=0.995, metadata={"help": "EMA decay of the target value net V̄"})
    terminal_w: float = field(
        default=1.0,
        metadata={"help": "weight of terminal matching at l=L (value ≈ CE_i and ∇V ≈ g_L)"},
    )
    dfa_warmup: bool = field(
        default=False,
        metadata={
            "help": "use DFA credits a_l = B_lᵀ e_T (fixed random B_l) during the first warmup_frac of training"
        },
    )
    warmup_frac: float = field(
        default=0.2,
        metadata={
            "help": "fraction of all training steps covered by the DFA warm-up (with dfa_warmup=true)"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least("K", self.K, 1)
        check_nonnegative("sigma", self.sigma)
        check_choice("noise", self.noise, NOISE)
        check_positive("temp", self.temp)
        check_fraction("ema", self.ema)
        check_nonnegative("terminal_w", self.terminal_w)
        check_fraction("warmup_frac", self.warmup_frac)
        if not self.dfa_warmup and self.warmup_frac != 0.2:
            raise ConfigError(
                f"cb.warmup_frac={self.warmup_frac} has no effect without cb.dfa_warmup=true; set both, or drop it"
            )


class ValueNet(nn.Module):
    """V's parts: the conditioned trunk (without the code), P (width -> C) and c(s)."""

    def __init__(self, dims: list[int], width: int, depth: int, num_classes: int):
        super().__init__()
        C = num_classes
        self.trunk = estimator.Estimator(dims, width, depth)
        self.logits = nn.Linear(width, C)  # P
        self.base = nn.Sequential(nn.Linear(C, width), nn.GELU(), nn.Linear(width, 1))  # c(s)


@RULES.register(
    "cb",
    "Credit Bridge: learned value V(h_l, τ(l), e_T), a_l = ∇_{h_l} V; soft-min bridge consistency + terminal matching",
)
class CreditBridge(estimator.EstimatorRule[CBOptions, ValueNet]):
    Options = CBOptions

    def build(self, shapes: list[tuple[int, ...]]) -> ValueNet:
        dims = [int(torch.Size(s).numel()) for s in shapes]
        return ValueNet(dims, self.opts.width, self.opts.depth, self.ctx.num_classes)

    def after_build(self) -> None:
        self.target = estimator.ema_copy(self.built())
        self.B: list[Tensor] = []
        if self.opts.dfa_warmup:
            dims = [int(torch.Size(s).numel()) for s in self.shapes]
            C = self.ctx.num_classes
            # a_l = B_lᵀ e_T: B_l (C, D_l) with N(0, 1/C) entries, like dfa's, from the estimator's seed
            self.B = [random_matrix((C, D), C, "normal", 1.0).to(self.ctx.device) for D in dims]

    def extra_state(self) -> dict:
        return {"target": self.target.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.target.load_state_dict(state["target"])

    @staticmethod
    def value(net: ValueNet, hs: list[Tensor], layers: list[int], s: Tensor) -> list[Tensor]:
        """V for each state hs[i] (N_i, ...) of block index layers[i], N_i = k·B (k stacked
        copies of the batch): (N_i,) each."""
        base = net.base(s).squeeze(1)  # (B,)
        out = []
        for z in net.trunk.features(hs, layers):
            k = z.shape[0] // s.shape[0]
            out.append((net.logits(z) * s.repeat(k, 1)).sum(1) + base.repeat(k))
        return out

    def in_warmup(self) -> bool:
        return self.opts.dfa_warmup and self.steps < self.opts.warmup_frac * self.ctx.total_steps

    # ---- Rule interface -----------------------------------------------------------------------
    def credits(self, model: CreditNet, x: Tensor, y: Tensor, fwd: Forward) -> list[Tensor]:
        self.ready(fwd.hs)
        if self.in_warmup():
            e = estimator.terminal_code("error", fwd.logits, y)  # (B, C)
            return [(e @ B).view_as(h).to(h.dtype) for B, h in zip(self.B, fwd.hs, strict=True)]
        s = estimator.terminal_code(self.opts.code, fwd.logits, y)
        with torch.enable_grad():
            hs = [h.detach().requires_grad_(True) for h in fwd.hs]
            vs = self.value(self.built(), hs, list(range(len(hs))), s)
            grads = torch.autograd.grad(torch.stack([v.sum() for v in vs]).sum(), hs)  # states only
        return [g.detach() for g in grads]

    def step(self, model: CreditNet, x: Tensor, y: Tensor, fwd: Forward) -> dict[str, Tensor]:
        self.ready(fwd.hs)
        o = self.opts
        hs = [h.detach().float() for h in fwd.hs]
        L, B = len(hs) - 1, y.shape[0]
        s = estimator.terminal_code(o.code, fwd.logits, y)

        # Consistency targets: soft-min of V̄ over K noisy copies of h_{l+1}, l = 0..L−1.
        targets: list[Tensor] = []
        if L > 0:
            with torch.no_grad():
                noisy = []
                for h in hs[1:]:
                    xi = torch.randn(
                        ((o.K + 1) // 2, *h.shape), generator=self.gen, device=h.device
                    )
                    xi = torch.cat([xi, -xi])[: o.K]  # (K, B, ...): antithetic pairs ±ξ
                    scale = (
                        o.sigma * estimator.expand_like(estimator.rms(h), h)
                        if o.noise == "relative"
                        else o.sigma
                    )
                    noisy.append((h + scale * xi).flatten(0, 1))  # (K·B, ...)
                vbar = self.value(self.target, noisy, list(range(1, L + 1)), s)
                for v in vbar:
                    v = v.view(o.K, B)
                    targets.append(-o.temp * (torch.logsumexp(-v / o.temp, dim=0) - math.log(o.K)))

        # Terminal truth from the current readout.
        ce, g = estimator.terminal_loss_and_grad(model, fwd.hs[L], y)
        g = g.float()

        h_L = hs[L].requires_grad_(True)
        vs = self.value(self.built(), hs[:L] + [h_L], list(range(L + 1)), s)
        zero = vs[0].new_zeros(())
        cons = (
            torch.stack(
                [(v - t).pow(2).mean() for v, t in zip(vs[:L], targets, strict=True)]
            ).mean()
            if L
            else zero
        )
        (grad_v,) = torch.autograd.grad(
            vs[L].sum(), h_L, create_graph=True
        )  # (B, ...) per-sample ∇V
        val = (vs[L] - ce.float()).pow(2).mean()
        tiny = torch.finfo(torch.float32).tiny
        g_norm, a_norm = g.flatten(1).norm(dim=1), grad_v.flatten(1).norm(dim=1)
        cos = estimator.per_sample_cosine(grad_v, g)
        log_ratio = torch.log(a_norm.clamp_min(tiny)) - torch.log(g_norm.clamp_min(tiny))
        valid = (g_norm > 0).float()
        grad_term = ((1.0 - cos + log_ratio.pow(2)) * valid).sum() / valid.sum().clamp_min(1.0)
        loss = cons + o.terminal_w * (val + grad_term)
        self.train_on(loss)
        estimator.ema_update(self.target, self.built(), o.ema)
        return {
            "loss": loss.detach(),
            "consistency": cons.detach(),
            "terminal_value": val.detach(),
            "terminal_grad": grad_term.detach(),
            "terminal_cos": cos.detach().mean(),
        }
