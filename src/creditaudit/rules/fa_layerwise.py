"""``fa_layerwise`` — textbook Feedback Alignment (Lillicrap et al. 2016): a fixed random matrix in place
of every weight transpose inside the blocks and of the head's transpose; everything else (the
identity path of residual blocks, norms, activations, BatchNorm, attention's softmax) is
backpropagated exactly.

Backward of each patched layer y = W x + b (``nn.Linear``, or a convolution read as a linear map):
         dL/dx = Bᵀ dL/dy     B fixed random, W's shape, in place of W
         dL/dW, dL/db         exact (the layer's own local gradients)
Credit:  a_l = "d(Σ_i CE_i)/d h_l" under this backward (per sample, not divided by B): a forward
         pass from sg(h_0) through the blocks and the readout, and one backward pass. The
         embedding's own layers need no feedback matrix — a_0 is the credit arriving at h_0.
Update:  the shared local update (docs/science.md §1), with the blocks' layers patched during the trainer's
         local forward/backward (``local_forward``): each block's parameters are updated from a_l
         through the block's own feedback matrices, as textbook FA does; the embedding from a_0.
         The head is patched in the credit pass only (B_H carries e_T into h_L), not in the local
         pass, so terminal norm and head keep their exact CE gradient as docs/science.md §1 requires
         (patching it there would send B_H's signal into the terminal norm's parameters).
Matrices: one B per ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` of the blocks and the head, drawn in ``setup`` from
         torch's global CPU RNG (seeded from the run seed right before the model) in the model's
         module order. ``init=uniform, scale=1``: U(±scale/√fan_in), fan_in = W[0].numel() — the
         distribution of PyTorch's default init of the layer it shadows; ``init=normal``: the same
         variance; ``init=weights``: a copy of the layer's initial W (then fixed; BP at step 0).
         :meth:`FALayerwise.align_to_weights` sets B = W for the current weights (B = W makes this
         rule exactly BP — ``tests/test_rules_feedback.py`` pins it).
Other layer types with weight matrices (Conv1d, MultiheadAttention, …) inside a block are refused at
``setup`` rather than silently backpropagated exactly. The patched layers and the credit pass are
shared with the other layerwise rules (``usf``, ``frsf``, ``brsf``, ``kp``) in ``rules/_layerwise.py``.
Defaults: init=uniform, scale=1.0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from creditaudit.models.base import CreditNet
from creditaudit.rules._layerwise import (
    FEEDBACK_INITS,
    LayerwiseFeedbackRule,
    WeightLayer,
    fa_forward,  # noqa: F401  (re-exported)
    feedback_layers,  # noqa: F401  (re-exported)
    initial_feedback,
)
from creditaudit.rules.base import RULES, RuleContext
from creditaudit.rules.options import check_choice, check_positive


@dataclass
class FALayerwiseOptions:
    """Distribution of the feedback matrices that replace each weight transpose."""

    init: str = field(
        default="uniform",
        metadata={
            "help": (
                "feedback matrices B: uniform U(±scale/√fan_in) (PyTorch's default layer init) | "
                "normal (same variance) | weights (a copy of the initial W, then fixed)"
            )
        },
    )
    scale: float = field(
        default=1.0,
        metadata={
            "help": (
                "multiplies the bound/std of B (uniform, normal); 1 = the spread of PyTorch's "
                "default init of the layer"
            )
        },
    )

    def __post_init__(self) -> None:
        check_choice("init", self.init, FEEDBACK_INITS)
        check_positive("scale", self.scale)


# ---------------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------------
@RULES.register(
    "fa_layerwise",
    "textbook feedback alignment: fixed random B in place of every weight transpose (blocks, head)",
)
class FALayerwise(LayerwiseFeedbackRule[FALayerwiseOptions]):
    Options = FALayerwiseOptions

    def __init__(self, options: FALayerwiseOptions | None = None):
        super().__init__(options)
        self.feedback: dict[
            str, Tensor
        ] = {}  # layer name -> B (W's shape), float32, on the run's device

    def setup(self, model: CreditNet, ctx: RuleContext) -> None:
        self.device = ctx.device
        self.feedback = {}
        for name, m in self.layers(model):
            self.feedback[name] = initial_feedback(
                m.weight, self.opts.init, self.opts.scale, ctx.device, torch.float32
            )

    @torch.no_grad()
    def align_to_weights(self, model: CreditNet) -> None:
        """B = W for every patched layer (the current weights, copied; in W's dtype): BP exactly."""
        for name, m in self.layers(model):
            self.feedback[name] = m.weight.detach().clone(memory_format=torch.contiguous_format)

    def feedback_for(self, name: str, m: WeightLayer) -> Tensor:
        return self.feedback[name]

    # -------------------------------------------------------------------------------------------
    # checkpoints
    # -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"feedback": dict(self.feedback)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        given = state["feedback"]
        if set(given) != set(self.feedback) and self.feedback:
            raise ValueError(
                f"fa_layerwise checkpoint has feedback for {sorted(given)}, the model needs {sorted(self.feedback)}"
            )
        self.feedback = {k: v.to(self.device) for k, v in given.items()}
