"""``pepita`` — PEPITA, error-driven input modulation (Dellaferrera & Kreiman 2022): two forward
passes, the second on the input shifted by a fixed random projection of the first pass's error;
every layer learns from how its activity differs between the two. No backward pass.

Passes:  clean      h_0..h_L from x (the trainer's own forward pass), e_T = softmax(o) − onehot(y);
         modulated  h_0^m..h_L^m from x^m = x + F e_T, F a fixed random matrix C -> input shape
         (the second pass runs inside ``credits``, BatchNorm's running statistics untouched).
Credit:  a_l = h_l − h_l^m,   l = 0..L   (the state's difference between the passes, its own shape).
         To first order h_l − h_l^m = −J_{h_l←x} F e_T: DFA-like, with an *adaptive* feedback path
         −J F that changes as the network learns (Srinivasan et al. 2023's reading of PEPITA).
Update:  the shared local update (docs/science.md §1) with these credits.

The paper's update and how it maps onto per-state credits. The paper trains an MLP
h_ℓ = σ(W_ℓ h_{ℓ−1}) (h_0 = x, no biases) with
    ΔW_ℓ = (h_ℓ − h_ℓ^m) (h_{ℓ−1}^m)ᵀ         hidden layers (h_0^m = x^m for the first),
    ΔW_out = e^m (h_{L}^m)ᵀ                    output layer (its code: the modulated pass's error),
    W ← W − η ΔW / batch.
The local update with credit a_ℓ = h_ℓ − h_ℓ^m gives the layer ∂⟨f_ℓ(sg h_{ℓ−1}), a_ℓ⟩/∂W_ℓ =
((h_ℓ − h_ℓ^m) ⊙ σ'(W_ℓ h_{ℓ−1})) h_{ℓ−1}ᵀ: the same post-synaptic difference and sign, with
  (i)  the clean pass's presynaptic activity h_{ℓ−1} (x for the first layer) instead of the
       modulated one — they differ by O(‖F e‖);
  (ii) the factor σ'(W h_{ℓ−1}) — for ReLU 1 on units active in the clean pass, which changes
       nothing except on the units inactive in the clean pass and active in the modulated one
       (there the paper uses −h^m, we 0), a set of measure O(‖F e‖) with differences O(‖F e‖).
Both remainders are second order in the modulation, so on a ReLU MLP this rule's update is the
paper's to first order in F (``tests/test_rules_targets.py`` pins it on a hand-written two-layer
MLP: relative difference ≈ ‖F e‖/‖x‖, shrinking in proportion to F's scale). Biases (the paper has
none) get the same post-synaptic term. On residual blocks, norms and attention a_l is the state's
difference as is (skip path included), fed through the block's own Jacobian like every credit.
The readout differs more: docs/science.md §1 gives the terminal norm and head their exact CE gradient at
the clean pass, e_T (h_L)ᵀ, where the paper's code uses e^m (h_L^m)ᵀ (again O(‖F e‖) apart).

What follows the paper and what does not:
- F: the paper's, entries U(±F_scale·√(6/n_in)) with n_in the input's size per sample and
  F_scale = 0.05 (0.05 × He-uniform, mean zero, as in its fully connected tutorial), drawn from the
  run seed alone (``rules/_feedback.py``'s generator) when the first batch shows the input shape
  (the rule context does not carry it) — the same matrix whenever it is drawn — and checkpointed.
  F sets the size of the modulation, hence how linear the difference is, not only a step size.
- The optimizer is the study's (AdamW 1e-3, cosine schedule, batch 128, one state per block) as for
  every rule, not the paper's SGD with momentum 0.9, η = 0.01, ×0.1 at epochs 60 and 90, batch 64,
  dropout 0.9 (the same mask in both passes): a rule does not own the optimizer. Under AdamW the
  paper's balance between the small hidden updates (∝ F) and the output layer's is gone.
- Every architecture runs: x^m has the input's shape, so any embedding takes it.
Metric: ``rule/mod_ratio`` = mean_i ‖F e_T,i‖/‖x_i‖, the modulation's relative size (the paper's
regime is ≪ 1).
Defaults: F_scale 0.05.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from creditaudit.models.base import CreditNet, Forward, preserved_buffers
from creditaudit.rules._feedback import feedback_generator, output_error, random_matrix
from creditaudit.rules.base import RULES, Rule, RuleContext
from creditaudit.rules.options import check_positive


@dataclass
class PEPITAOptions:
    """Scale of PEPITA's fixed input-modulation matrix F (C -> input shape)."""

    F_scale: float = field(
        default=0.05,
        metadata={
            "help": (
                "entries of F are U(±F_scale·√(6/n_in)), n_in = input size per sample (paper: "
                "0.05, i.e. 0.05 × He-uniform)"
            )
        },
    )

    def __post_init__(self) -> None:
        check_positive("F_scale", self.F_scale)


@RULES.register(
    "pepita",
    "PEPITA: second forward pass on x + F e_T (fixed random F); a_l = h_l − h_l(modulated)",
)
class PEPITA(Rule[PEPITAOptions]):
    Options = PEPITAOptions
    stack_refusal = "draws its feedback matrix F at the first batch, whose input shape its context does not give"

    def __init__(self, options: PEPITAOptions | None = None):
        super().__init__(options)
        self.device = torch.device("cpu")
        self.seed: int | None = None
        self._gen: torch.Generator | None = None
        self.F: Tensor | None = None  # (n_in, C), float32, on self.device; drawn at the first batch

    def setup(self, model: CreditNet, ctx: RuleContext) -> None:
        self.device = ctx.device
        self.seed, self._gen = feedback_generator()

    def modulation(self, x: Tensor, e: Tensor) -> Tensor:
        """F e_T in the input's shape, (B, ...) like x. Draws F on the first call."""
        n_in = x[0].numel()
        if self.F is None:
            if self._gen is None:
                raise RuntimeError("pepita: call setup(model, ctx) before using the rule")
            C = e.shape[1]
            # U(±F_scale·√(6/n_in)) = variance F_scale²·2/n_in: random_matrix's uniform with scale F_scale·√2.
            self.F = random_matrix(
                (n_in, C), n_in, "uniform", self.opts.F_scale * math.sqrt(2.0), self._gen
            ).to(self.device)
        if self.F.shape != (n_in, e.shape[1]):
            raise ValueError(
                f"pepita: F has shape {tuple(self.F.shape)} but the batch needs ({n_in}, {e.shape[1]})"
            )
        return (e.to(x.dtype) @ self.F.to(x.dtype).T).view_as(x)

    def credits(self, model: CreditNet, x: Tensor, y: Tensor, fwd: Forward) -> list[Tensor]:
        e = output_error(fwd.logits, y)  # (B, C), from the clean pass
        shift = self.modulation(x, e)  # (B, ...) like x
        with torch.no_grad(), preserved_buffers(model):
            mod = model.run(x + shift)  # the modulated pass: h_0^m..h_L^m
        self.report(
            mod_ratio=(
                shift.flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1).clamp_min(1e-12)
            ).mean()
        )
        return [(h.detach() - hm).to(h.dtype) for h, hm in zip(fwd.hs, mod.hs, strict=True)]

    def state_dict(self) -> dict[str, Any]:
        # F is drawn from a generator seeded with ``seed`` and used for nothing else: the seed
        # redraws it exactly until the first batch has drawn it; from then on F is stored.
        return {"seed": self.seed, **({"F": self.F} if self.F is not None else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self._gen = torch.Generator(device="cpu").manual_seed(self.seed)
        self.F = state["F"].to(self.device, torch.float32) if "F" in state else None
