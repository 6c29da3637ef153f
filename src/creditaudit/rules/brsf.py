"""``brsf`` — batchwise random-magnitude sign-concordant feedback (Liao, Leibo & Poggio 2016; Moskovitz
et al. 2018): in place of every weight transpose inside the blocks and of the head's, a random
magnitude, redrawn after every update of the weights, times the sign of the current weights.

Backward of each patched layer y = W x + b (``nn.Linear``, or ``nn.Conv2d`` read as a linear map):
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

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from creditaudit.models.base import CreditNet, Forward
from creditaudit.rules._feedback import INITS, check_choice, check_positive, feedback_generator
from creditaudit.rules._layerwise import SignConcordantRule
from creditaudit.rules.base import RULES, RuleContext


@dataclass
class BRSFOptions:
    """Distribution of brSF's per-step magnitudes |R_t| in B_t = |R_t| ∘ sign(W_t)."""

    init: str = field(default="normal", metadata={"help": "entries of R_t: normal N(0, (scale·s)²) | uniform (same variance); s = std of the layer's initial weights"})
    scale: float = field(default=1.0, metadata={"help": "R_t has std scale·s (1: |B| has the spread of the layer's init)"})

    def __post_init__(self) -> None:
        check_choice("brsf", "init", self.init, INITS)
        check_positive("brsf", "scale", self.scale)


@RULES.register("brsf", "batchwise random-magnitude sign-concordant feedback: |R_t|∘sign(W) in place of every weight transpose, R_t redrawn each step")
class BRSF(SignConcordantRule):
    Options = BRSFOptions
    name = "brsf"

    def __init__(self, options: BRSFOptions | None = None):
        super().__init__(options)
        self.seed: int | None = None
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
        return {"seed": self.seed, "draws": self.draws, "generator": self.generator.get_state(),
                "init_std": dict(self.init_std), "magnitude": dict(self.magnitude)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.magnitude and set(state["magnitude"]) != set(self.magnitude):
            raise ValueError(f"brsf checkpoint has layers {sorted(state['magnitude'])}, the model needs {sorted(self.magnitude)}")
        self.seed, self.draws = state["seed"], int(state["draws"])
        self.generator = torch.Generator(device="cpu")
        self.generator.set_state(state["generator"].cpu().to(torch.uint8).contiguous())
        self.init_std = {k: float(v) for k, v in state["init_std"].items()}
        self.magnitude = {k: v.to(self.device) for k, v in state["magnitude"].items()}
