"""``usf`` — uniform sign-concordant feedback (sign symmetry; Liao, Leibo & Poggio 2016; Moskovitz et
al. 2018): in place of every weight transpose inside the blocks and of the head's, the sign of the
current weights times one number per layer.

Backward of each patched layer y = W x + b (``nn.Linear``, or a convolution read as a linear map):
         dL/dx = Bᵀ dL/dy,   B = s · sign(W)    W the layer's *current* weights
         dL/dW, dL/db        exact (the layer's own local gradients)
         s = scale · std(W_init), the std of the layer's initial weights (read once in ``setup``:
         1/√(3·fan_in) for PyTorch's default init, w2_std for resmlp's W2), so that B has the
         spread of the layer's init. Liao et al.'s bare sign(W) (entries ±1) multiplies the
         credit by about 1/s per layer; the scale s removes that (the scaled sign feedback of
         Moskovitz et al. 2018 and Xiao et al. 2018).
Credit:  a_l = "d(Σ_i CE_i)/d h_l" under this backward (per sample, not divided by B): a forward
         pass from sg(h_0) through the blocks and the readout, and one backward pass (the
         skeleton of ``fa_layerwise``, ``rules/_layerwise.py``). a_0 trains the embedding.
Update:  the shared local update (docs/science.md §1), with the blocks' layers patched during the trainer's
         local forward/backward: each block's parameters learn from a_l through s·sign(W); the
         head is patched in the credit pass only (terminal norm and head keep their exact CE
         gradient). B is recomputed from W every time the layers are patched — every training
         step, every probe — so sign(B) = sign(W) always; usf trains nothing of its own.
Random state: none (s comes from the model's init, itself drawn from the run seed); s is
         checkpointed.
Defaults: scale=1.0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from creditaudit.models.base import CreditNet
from creditaudit.rules._layerwise import SignConcordantRule
from creditaudit.rules.base import RULES, RuleContext
from creditaudit.rules.options import check_positive


@dataclass
class USFOptions:
    """The magnitude of uSF's feedback B = s·sign(W)."""

    scale: float = field(
        default=1.0,
        metadata={
            "help": "s = scale · std of the layer's initial weights (1: B has the spread of the layer's init)"
        },
    )

    def __post_init__(self) -> None:
        check_positive("scale", self.scale)


@RULES.register(
    "usf",
    "uniform sign-concordant feedback: s·sign(W) in place of every weight transpose, s = the std of W's init",
)
class USF(SignConcordantRule[USFOptions]):
    Options = USFOptions

    def setup(self, model: CreditNet, ctx: RuleContext) -> None:
        super().setup(model, ctx)
        self.magnitude = {
            name: torch.tensor(self.opts.scale * s, dtype=torch.float64, device=self.device)
            for name, s in self.init_std.items()
        }

    def state_dict(self) -> dict[str, Any]:
        return {"init_std": dict(self.init_std)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        given = {k: float(v) for k, v in state["init_std"].items()}
        if self.init_std and set(given) != set(self.init_std):
            raise ValueError(
                f"usf checkpoint has layers {sorted(given)}, the model needs {sorted(self.init_std)}"
            )
        self.init_std = given
        self.magnitude = {
            name: torch.tensor(self.opts.scale * s, dtype=torch.float64, device=self.device)
            for name, s in given.items()
        }
