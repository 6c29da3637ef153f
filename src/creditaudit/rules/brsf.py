"""``brsf`` — batchwise random-magnitude sign-concordant feedback (Liao, Leibo & Poggio 2016; Moskovitz
et al. 2018): in place of every weight transpose inside the blocks and of the head's, a random
magnitude, redrawn after every update of the weights, times the sign of the current weights.

Backward of each patched layer y = W x + b (``nn.Linear``, or a convolution read as a linear map):
         dL/dx = Bᵀ dL/dy,   B_t = |R_t| ∘ sign(W_t)    W_t the current weights, R_t this step's draw
         dL/dW, dL/db        exact (the layer's own local gradients)
Credit:  a_l = "d(Σ_i CE_i)/d h_l" under this backward (per sample, not divided by B): a forward
         pass from sg(h_0) through the blocks and the readout, and one backward pass (the
         skeleton of ``fa_layerwise``, ``rules/_layerwise.py``). a_0 trains the embedding.
Update:  the shared local update (docs/science.md §1), with the blocks' layers patched during the trainer's
         local forward/backward; the head is patched in the credit pass only (terminal norm and
         head keep their exact CE gradient). sign(W) is re-read every time the layers are patched,
         so sign(B) = sign(W) at every step. R_t is redrawn in ``step()``, i.e. right after each
         optimizer step ("after each update of W", Liao et al.); a probe or any other extra
         credit pass uses the current R_t and draws nothing, so diagnostics never change the
         training draws. brsf trains nothing of its own.
Matrices: R_t per patched layer, W's shape, entries i.i.d. with variance (scale·s)², s = the std of the
         layer's initial weights (|B| has the spread of the init, as ``usf``'s s·sign(W)):
         ``init=normal`` N(0, (scale·s)²), ``init=uniform`` U(±√3·scale·s) (Liao et al. find the
         magnitudes do not matter; the distribution is this package's choice). R_0 is drawn in
         ``setup`` and R_1, R_2, … one per step, in module order, on the CPU from one private
         generator seeded from the run's seeded global RNG (``rules/_feedback.py``): the sequence
         is a function of (run seed, model) alone, identical on every device. The generator's
         state and the current R_t are checkpointed, so a resumed run draws what an uninterrupted
         one would.
Defaults: init=normal, scale=1.0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from creditaudit.models.base import CreditNet, Forward
from creditaudit.rules._feedback import feedback_generator
from creditaudit.rules._layerwise import RandomMagnitudeOptions, RandomMagnitudeRule
from creditaudit.rules.base import RULES, RuleContext


@dataclass
class BRSFOptions(RandomMagnitudeOptions):
    """Distribution of brSF's per-step magnitudes |R_t| in B_t = |R_t| ∘ sign(W_t) (R_t redrawn
    after every update, from the same distribution)."""


@RULES.register(
    "brsf",
    "batchwise random-magnitude sign-concordant feedback: |R_t|∘sign(W) in place of every "
    "weight transpose, R_t redrawn each step",
)
class BRSF(RandomMagnitudeRule[BRSFOptions]):
    Options = BRSFOptions
    stack_refusal = (
        "redraws its feedback magnitudes in every step from its own generator, "
        "and patches the model's layers"
    )

    def __init__(self, options: BRSFOptions | None = None):
        super().__init__(options)
        self.generator = torch.Generator(device="cpu")
        self.draws = 0  # R_0..R_{draws-1} drawn so far; the current one is R_{draws-1}

    def setup(self, model: CreditNet, ctx: RuleContext) -> None:
        super().setup(model, ctx)
        self.seed, self.generator = feedback_generator()
        self.draws = 0
        self._redraw()

    def _redraw(self) -> None:
        self.magnitude = self.random_magnitudes(self.generator, self.opts.init, self.opts.scale)
        self.draws += 1

    def step(self, model: CreditNet, x: Tensor, y: Tensor, fwd: Forward) -> dict[str, Tensor]:
        """W was just updated: draw the next R."""
        self._redraw()
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "draws": self.draws,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.draws = int(state["draws"])
        self.generator = torch.Generator(device="cpu")
        self.generator.set_state(state["generator"].cpu().to(torch.uint8).contiguous())
