"""``fwdgrad`` — the forward gradient by activity perturbation (Baydin et al. 2022; Ren et al. 2022):
a random direction per sample and state, and the loss's directional derivative along it, computed
in forward mode — no backward pass.

Credit:  a_l = (1/K) Σ_k (g_l · v_k) v_k,   v_k ~ N(0, I) per sample, of the shape of h_l,   l = 0..L
         g_l · v = d/dε CE_i(H(N(blocks_{l+1..L}(h_l + ε v)))) at ε = 0, one Jacobian-vector product
         (``torch.func.jvp``) of the per-sample loss through ``model.forward_from(l, ·)`` — the
         CURRENT blocks above l, terminal norm and head — with tangent v. K = ``directions``
         (default 1, as both papers); the K directions run as one JVP of K stacked copies of the batch.
Unbiased: E[(g·v) v] = E[v vᵀ] g = g, so E[a_l] = g_l exactly, and E‖a_l − g_l‖² = (D_l + 1)‖g_l‖²/K
         for a state of D_l = numel(h_l) features per sample. Per direction, cos(a_l, g_l) =
         |cos(v, g_l)|, whose mean is Γ(D/2) / (√π Γ((D+1)/2)) ≈ √(2/(π D)): the rule's Γ_l is known
         in advance — about 0.2 at D = 16, 0.05 at 256, 0.009 at the 8192 features of smallcnn's
         first CIFAR stage. (``tests/test_rules_targets.py`` pins both.)
Samples that interact: BatchNorm in training mode (smallcnn) normalises with the batch's
         statistics, so CE_i depends on every h_l,j and g_l,i = Σ_j ∂CE_j/∂h_l,i (the reference g
         of docs/science.md §1: the
         gradient of the summed loss). One JVP then gives Σ_j ∂CE_i/∂h_l,j · v_j per sample, not
         g_l,i · v_i; the credit uses the batch's directional derivative s = Σ_i g_l,i · v_i (the sum
         of those) instead, a_l,i = s v_i: still unbiased for g_l,i, with the variance of a direction
         in all B·D_l features of the batch (per-sample derivatives would need one JVP per sample);
         the K directions then run one by one (stacked copies would share their statistics). In
         eval mode (the diagnostics) the samples are independent again: the per-sample form.
Update:  the shared local update (docs/science.md §1) with these credits (Ren et al.'s "activity perturbation":
         the state's forward gradient, then the block's own local derivative). No estimator.
Randomness: a seed drawn in ``setup`` from the run's seeded global RNG, and for each batch a
         generator on the device seeded from (that seed, the number of training steps so far): the
         directions are a function of the run seed and the step alone. A diagnostic probe between
         two steps draws the next step's directions without consuming them, so probing never
         changes training; the state to resume is (seed, steps). Attention runs in its math kernel
         during the JVP (the fused kernels have no forward-mode derivative).
Defaults: directions 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.batchnorm import _BatchNorm

from creditaudit.errors import ConfigError
from creditaudit.models.base import CreditNet, Forward
from creditaudit.rules._feedback import feedback_generator
from creditaudit.rules.base import RULES, Rule, RuleContext


@dataclass
class FwdGradOptions:
    """How many random directions each state's forward gradient averages."""

    directions: int = field(
        default=1,
        metadata={
            "help": (
                "random directions v per sample and state, averaged: a_l = mean_k (g_l·v_k) v_k "
                "(the papers: 1); E‖a−g‖² = (D+1)‖g‖²/K"
            )
        },
    )

    def __post_init__(self) -> None:
        if (
            isinstance(self.directions, bool)
            or not isinstance(self.directions, int)
            or self.directions < 1
        ):
            raise ConfigError(f"fwdgrad.directions={self.directions!r}: expected an integer >= 1")


def _stream_seed(seed: int, step: int) -> int:
    """A 63-bit seed for step ``step`` of the stream ``seed`` (splitmix64 of their combination)."""
    z = (seed + (step + 1) * 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return (z ^ (z >> 31)) >> 1


def couples_samples(model: CreditNet, l: int) -> bool:
    """Whether the rows of a batch interact from state h_l on: a BatchNorm using batch statistics
    (training mode, or no running statistics) in blocks l+1..L, the terminal norm or the head."""
    parts = [*model.blocks[l:], model.norm, model.head]
    return any(
        isinstance(m, _BatchNorm) and (m.training or not m.track_running_stats)
        for part in parts
        for m in part.modules()
    )


def directional_derivatives(model: CreditNet, l: int, h: Tensor, y: Tensor, v: Tensor) -> Tensor:
    """d CE_i / dε along the tangent v at h (rows of h_l, any number), one forward-mode JVP through
    blocks l+1..L, norm and head: (N,). No parameter gradient, no buffer moves."""

    def per_sample_loss(state: Tensor) -> Tensor:
        return F.cross_entropy(model.forward_from(l, state), y, reduction="none")

    with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        return torch.func.jvp(per_sample_loss, (h,), (v,))[1]  # (primal out, tangent out)


@RULES.register(
    "fwdgrad",
    "forward gradient: a_l = (g_l·v) v, v ~ N(0, I) per sample, by a forward-mode JVP (no backward pass)",
)
class ForwardGradient(Rule[FwdGradOptions]):
    Options = FwdGradOptions
    stack_refusal = "draws random tangent directions in every step from its own generator"

    def __init__(self, options: FwdGradOptions | None = None):
        super().__init__(options)
        self.seed: int | None = None
        self.steps = 0  # training steps taken (the direction stream's counter)

    def setup(self, model: CreditNet, ctx: RuleContext) -> None:
        self.seed, _ = feedback_generator()  # one draw from the run's seeded global RNG

    def credits(self, model: CreditNet, x: Tensor, y: Tensor, fwd: Forward) -> list[Tensor]:
        if self.seed is None:
            raise RuntimeError("fwdgrad: call setup(model, ctx) before using the rule")
        K = self.opts.directions
        device = fwd.hs[0].device
        gen = torch.Generator(device=device).manual_seed(_stream_seed(self.seed, self.steps))
        credits = []
        for l, h in enumerate(fwd.hs):
            h = h.detach()
            B = h.shape[0]
            v = torch.randn(
                (K, *h.shape), generator=gen, device=device, dtype=h.dtype
            )  # (K, B, ...)
            expand = (K, B, *[1] * (h.dim() - 1))
            if couples_samples(model, l):
                # the batch's directional derivative s_k = Σ_i g_l,i·v_k,i, one JVP per direction
                s = torch.stack(
                    [directional_derivatives(model, l, h, y, v[k]).sum() for k in range(K)]
                )  # (K,)
                a = (s.view(K, *[1] * h.dim()) * v).mean(0)
            else:
                u = directional_derivatives(
                    model, l, h.repeat(K, *[1] * (h.dim() - 1)), y.repeat(K), v.flatten(0, 1)
                )
                a = (u.view(expand) * v).mean(0)  # (B, ...)
            credits.append(a.detach())
        return credits

    def step(self, model: CreditNet, x: Tensor, y: Tensor, fwd: Forward) -> dict[str, Tensor]:
        self.steps += 1  # the next batch draws new directions
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.steps = int(state["seed"]), int(state["steps"])
