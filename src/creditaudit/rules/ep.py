"""``ep`` — equilibrium propagation on the prediction-error energy of the network (docs/science.md §3).

States s_0..s_L have the shapes of h_0..h_L; s_0 = h_0 is clamped. With F_l(s) = s + f_l(s)
(F_l = f_l for a non-residual block) and the prediction errors ε_l = s_l − F_l(s_{l−1}),

    E(s)    = ½ Σ_{l=1..L} ‖ε_l‖²                     summed over the batch (samples do not interact,
    C_β(s)  = E(s) + β · Σ_i CE(H(N(s_L)), y)_i        except through BatchNorm's batch statistics)

Free phase: the forward pass, s^0 = h (every ε_l = 0, E = 0). Nudged phase: T steps of gradient
descent of size α on C_β over s_1..s_L from the free state, s ← s − α ∇_s C_β(s), giving s^β.
The relaxation runs on the displacements δ_l = s_l − h_l (so a credit of size 1e-5 is not lost in
the float32 rounding of an O(1) state), with derivatives with respect to the states only
(``creditaudit.autodiff``): parameter ``.grad`` is never touched, and buffers a forward pass may
change (BatchNorm running statistics) are left as
they were (``preserved_buffers``).

Credit (``credit=displacement``, the default; the definition of docs/science.md §3), l = 1..L:

    a_l = −(s_l^β − s_l^0) / β

Credit (``credit=error``), l = 1..L:   a_l = −ε_l(s^β) / β.
At a fixed point of the nudged dynamics ∂C_β/∂s_l = 0, i.e. ε_L = −β ∇_{s_L}CE and
ε_l = J_{l+1}ᵀ ε_{l+1} (J_l = ∂F_l/∂s_{l−1}): the prediction errors carry backprop's recursion, so
−ε_l/β → g_l exactly as β → 0, T → ∞. (It is also EP's own parameter update: (1/β) ∂E/∂θ_l at s^β
is the local update of docs/science.md §1 fed with this credit.) The displacement instead integrates the
errors, s_l^β − s_l^0 ≈ Σ_{k≤l} J_{l←k} ε_k, so in the same limit

    a_l → Σ_{k=1..l} J_{l←k} J_{l←k}ᵀ g_l          (J_{l←k} = J_l ⋯ J_{k+1}, J_{l←l} = I)

which points along g_l when the blocks are near-identity maps (a residual net at init: cos ≥ 0.99,
measured) but has norm ≈ l·‖g_l‖ there (docs/science.md §3: "≈ L·‖g‖"). We do not renormalise: the definition is
binding, and the study's optimizer (AdamW, one state per block) is invariant to a per-block scale.

Credit of the clamped embedding state, a_0 (both credit modes). EP gives the gradient of the loss
with respect to anything clamped (a parameter, here s_0) as the β-derivative of the total energy's
partial derivative: (1/β)[∂C_β/∂s_0(s^β) − ∂C_0/∂s_0(s^0)], and the free term is 0 (ε = 0). So

    a_0 = (1/β) ∂C_β/∂s_0 (s^β) = −J_1ᵀ ε_1(s^β) / β       (L ≥ 1; for L = 0 it is ∇_{s_0}CE = g_0)

which → J_1ᵀ g_1 = g_0 as β → 0, T → ∞ (tests pin this).

``symmetric``: nudge with +β and −β and take central differences, a = −(x^{+β} − x^{−β})/(2β) with x
the state (displacement), the prediction error (error), or, for a_0, ∂C_{±β}/∂s_0 — the O(β) bias of
the one-sided estimate cancels; it costs two relaxations.

Update: the shared local update (docs/science.md §1) with these credits; no estimator of its own.
Defaults: β = 0.1, T = 20, α = 0.1, credit = displacement, one-sided nudging.

Step size. Near the free state ∇²E = DᵀD with (Dδ)_l = δ_l − J_l δ_{l−1}, and gradient descent on E
is stable for α < 2/λ_max(DᵀD): α = 0.1 is stable on resmlp, mlp and smallcnn, vit_mini needs
``alpha=0.05``, and T = 20 steps leave the relaxation short of its equilibrium (the credit's norm,
not its direction). The measurements are in docs/science.md §9. The metric ``rule/relax_ratio`` =
‖∇C_β‖ at the last step / at the first says whether the relaxation converges (< 1) or diverges (≫ 1:
lower α).

Cost: T relaxation steps, each a forward and a state-only backward pass (no parameter gradients)
through blocks 2..L and the readout, batched over the batch; ≈ 7× a BP step at resmlp d=256, L=4.
Work reused: block 1's prediction F_1(s_0) never changes (computed once), and since the nudge climbs
down one layer per step, blocks whose input and output have not moved yet are skipped (they predict
their free state exactly); for L = 4, T = 20 that is 10% of the block evaluations, more when deeper.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.nn import functional as F

from creditaudit import autodiff
from creditaudit.models.base import CreditNet, Forward, preserved_buffers
from creditaudit.rules.base import RULES, Rule
from creditaudit.rules.options import check, check_choice, check_positive

CREDITS = ("displacement", "error")


@dataclass
class EPOptions:
    """Nudging strength, relaxation schedule, and what the credit is read from."""

    beta: float = field(
        default=0.1, metadata={"help": "nudging strength β > 0 on the summed cross-entropy"}
    )
    T: int = field(
        default=20, metadata={"help": "gradient-descent steps of the nudged relaxation (T >= 1)"}
    )
    alpha: float = field(
        default=0.1,
        metadata={
            "help": (
                "relaxation step size α > 0; stable for α < 2/λ_max(∇²E): ≈ 0.25–0.3 on resmlp "
                "and smallcnn, 0.07 on vit_mini (use alpha=0.05 there); watch rule/relax_ratio"
            )
        },
    )
    symmetric: bool = field(
        default=False,
        metadata={
            "help": "nudge with ±β and take central differences (removes the O(β) bias; two relaxations)"
        },
    )
    credit: str = field(
        default="displacement",
        metadata={
            "help": "displacement: a_l = −(s_l^β − s_l^0)/β | error: a_l = −ε_l(s^β)/β (→ g_l exactly as β → 0)"
        },
    )

    def __post_init__(self) -> None:
        check_positive("beta", self.beta)
        check(
            "T",
            self.T,
            isinstance(self.T, int) and not isinstance(self.T, bool) and self.T >= 1,
            "an integer >= 1",
        )
        check_positive("alpha", self.alpha)
        check_choice("credit", self.credit, CREDITS)


@dataclass
class _Nudged:
    """What one nudged relaxation leaves behind (x^{±β} in the module docstring)."""

    deltas: list[Tensor]  # δ_l = s_l^β − h_l, l = 1..L
    errors: list[Tensor]  # ε_l(s^β), l = 1..L (credit=error only; [] otherwise)
    d_s0: Tensor  # ∂C_β/∂s_0 at s^β
    relax_ratio: Tensor  # ‖∇C_β‖ at the last step / at the first step (scalar)


def _relax(
    model: CreditNet,
    hs: list[Tensor],
    y: Tensor,
    beta: float,
    T: int,
    alpha: float,
    want_errors: bool,
) -> _Nudged:
    """T steps of s ← s − α ∇_s C_β(s) from the free state s = h, on the displacements δ.

    Derivatives with respect to the states are vector-Jacobian products of the functions that
    produce them (``creditaudit.autodiff``), so the relaxation also runs with a run axis around it."""
    L = model.L
    blocks = model.blocks
    h0 = hs[0]

    def nudge(s_L: Tensor) -> Tensor:
        return beta * F.cross_entropy(model.readout(s_L), y, reduction="sum")

    if L == 0:  # nothing to relax: C_β = β·CE(H(N(s_0))), so ∂C_β/∂s_0 = β·g_0
        d_s0 = autodiff.grad(nudge, h0)
        return _Nudged([], [], d_s0, torch.ones((), device=h0.device))

    with torch.no_grad():
        pred1 = blocks[0](h0)[0]  # F_1(s_0): s_0 is clamped, so this prediction never changes
    # Block l's prediction as an offset from the free state, F_l(h_{l−1} + δ_{l−1}) − h_l, so that
    # ε_l = s_l − F_l(s_{l−1}) = δ_l − offset_l. For l = 1 it is the rounding of recomputing h_1.
    off1 = pred1 - hs[1]
    deltas = [torch.zeros_like(h) for h in hs[1:]]  # δ_1..δ_L, (B, ...) each
    first: Tensor | None = None  # Σ_l ‖∇_{δ_l} C_β‖² at the first step
    last: Tensor | None = None  # and at the last
    for t in range(T):
        # The nudge enters at s_L and climbs down one layer per step: before step t only δ_l with
        # l > L − t can be non-zero, so blocks below layer lo + 1 still predict their free state
        # exactly (ε = 0, no gradient) and are not evaluated.
        lo = max(1, L - t)  # lowest layer whose gradient can be non-zero at this step

        def offsets_and_nudge(*ds: Tensor, lo: int = lo) -> tuple[Tensor, ...]:  # ds = δ_lo..δ_L
            offs = [
                blocks[l - 1](hs[l - 1] + ds[l - 1 - lo])[0] - hs[l] for l in range(lo + 1, L + 1)
            ]
            return (*offs, nudge(hs[L] + ds[-1]))

        ds = deltas[lo - 1 :]
        outs, vjp = autodiff.vjp(offsets_and_nudge, *ds)
        offs = outs[:-1]
        errs = [ds[0] - (off1 if lo == 1 else 0.0)] + [
            d - o for d, o in zip(ds[1:], offs, strict=True)
        ]
        # ∇_{δ_l} C_β = ε_l − J_{l+1}ᵀ ε_{l+1} (+ β ∇CE at l = L): one state-only backward pass.
        back = vjp((*[-e for e in errs[1:]], torch.ones_like(outs[-1])))
        with torch.no_grad():
            grads = [e + b for e, b in zip(errs, back, strict=True)]
            if t == 0 or t == T - 1:
                sq = [g.pow(2).sum() for g in grads]  # ‖∇_{δ_l} C_β‖², l = lo..L
                last = sum(sq[1:], start=sq[0])
                first = last if t == 0 else first
            deltas[lo - 1 :] = [d - alpha * g for d, g in zip(ds, grads, strict=True)]

    # At s^β: ∂C_β/∂s_0 = −J_1ᵀ ε_1 (the CE term does not see s_0 when L >= 1), and the errors.
    err1 = deltas[0] - off1
    _, vjp1 = autodiff.vjp(lambda s0: blocks[0](s0)[0], h0)
    (d_s0,) = vjp1(-err1)
    errors: list[Tensor] = []
    if want_errors:
        with torch.no_grad():
            errors = [err1] + [
                deltas[l - 1] - (blocks[l - 1](hs[l - 1] + deltas[l - 2])[0] - hs[l])
                for l in range(2, L + 1)
            ]
    assert first is not None and last is not None  # T >= 1 steps (EPOptions checks it)
    ratio = (last / first.clamp_min(torch.finfo(first.dtype).tiny)).sqrt()
    return _Nudged(deltas, errors, d_s0, ratio)


@RULES.register(
    "ep", "equilibrium propagation: a_l = −(s_l^β − s_l^free)/β on the prediction-error energy"
)
class EP(Rule[EPOptions]):
    Options = EPOptions
    stack_refusal = None

    def credits(self, model: CreditNet, x: Tensor, y: Tensor, fwd: Forward) -> list[Tensor]:
        o = self.opts
        hs = [h.detach() for h in fwd.hs]
        want_errors = o.credit == "error"
        with preserved_buffers(model):
            plus = _relax(model, hs, y, o.beta, o.T, o.alpha, want_errors)
            minus = (
                _relax(model, hs, y, -o.beta, o.T, o.alpha, want_errors) if o.symmetric else None
            )
        # One-sided: the reference is the free state (δ = 0, ε = 0, ∂C_0/∂s_0 = 0).
        scale = 2 * o.beta if o.symmetric else o.beta
        x_plus = plus.errors if want_errors else plus.deltas
        x_minus = (
            (minus.errors if want_errors else minus.deltas)
            if minus
            else [torch.zeros_like(v) for v in x_plus]
        )
        a0 = (plus.d_s0 - (minus.d_s0 if minus else 0.0)) / scale
        credits = [a0] + [-(p - m) / scale for p, m in zip(x_plus, x_minus, strict=True)]
        ratio = (
            plus.relax_ratio
            if minus is None
            else torch.maximum(plus.relax_ratio, minus.relax_ratio)
        )
        self.report(relax_ratio=ratio.detach())
        return [a.detach() for a in credits]
