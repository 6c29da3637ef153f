"""``frsf`` — fixed random-magnitude sign-concordant feedback (Liao, Leibo & Poggio 2016; Moskovitz et
al. 2018): in place of every weight transpose inside the blocks and of the head's, a fixed random
magnitude times the sign of the current weights.

Backward of each patched layer y = W x + b (``nn.Linear``, or a convolution read as a linear map):
         dL/dx = Bᵀ dL/dy,   B = |R| ∘ sign(W)    W the layer's *current* weights, R fixed
         dL/dW, dL/db        exact (the layer's own local gradients)
Credit:  a_l = "d(Σ_i CE_i)/d h_l" under this backward (per sample, not divided by B): a forward
         pass from sg(h_0) through the blocks and the readout, and one backward pass (the
         skeleton of ``fa_layerwise``, ``rules/_layerwise.py``). a_0 trains the embedding.
Update:  the shared local update (docs/science.md §1), with the blocks' layers patched during the trainer's
         local forward/backward; the head is patched in the credit pass only (terminal norm and
         head keep their exact CE gradient). sign(W) is re-read from the weights every time the
         layers are patched, so B's signs follow W's (sign(B) = sign(W) at every step) while
         |B| = |R| never changes; frsf trains nothing of its own.
Matrices: one R per patched layer, W's shape, entries i.i.d. with variance (scale·s)², s = the std of
         the layer's initial weights (so |B| has the spread of the init, as ``usf``'s s·sign(W)
         does): ``init=normal`` N(0, (scale·s)²), ``init=uniform`` U(±√3·scale·s). Liao et al.
         find the magnitudes do not matter to performance; the distribution is this package's
         choice. Drawn once in ``setup``, in module order, on the CPU from a generator seeded from
         the run's seeded global RNG (``rules/_feedback.py``): a function of (run seed, model)
         alone, identical on every device, and checkpointed.
Defaults: init=normal, scale=1.0.
"""

from __future__ import annotations

from dataclasses import dataclass

from creditaudit.models.base import CreditNet
from creditaudit.rules._feedback import feedback_generator
from creditaudit.rules._layerwise import RandomMagnitudeOptions, RandomMagnitudeRule
from creditaudit.rules.base import RULES, RuleContext


@dataclass
class FRSFOptions(RandomMagnitudeOptions):
    """Distribution of frSF's fixed magnitudes |R| in B = |R| ∘ sign(W)."""


@RULES.register(
    "frsf",
    "fixed random-magnitude sign-concordant feedback: |R|∘sign(W) in place of every weight transpose, R drawn once",
)
class FRSF(RandomMagnitudeRule[FRSFOptions]):
    Options = FRSFOptions

    def setup(self, model: CreditNet, ctx: RuleContext) -> None:
        super().setup(model, ctx)
        self.seed, g = feedback_generator()
        self.magnitude = self.random_magnitudes(g, self.opts.init, self.opts.scale)
