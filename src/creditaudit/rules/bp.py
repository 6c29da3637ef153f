"""``bp`` — backpropagation, the gold-standard control.

Credit:  a_l = g_l = d CE_i / d h_l exactly (per sample), l = 0..L.
Update:  end to end — autograd on the batch-mean cross-entropy, one AdamW over all parameters
         (the same thing, parameter for parameter, as feeding a_l = g_l through the local update:
         ``tests/test_local_update.py`` pins it).
Defaults: none of its own.

``credits`` is still implemented (it is the oracle that other rules are compared against and that
the exploitability study feeds through the local rules).
"""

from __future__ import annotations

from torch import Tensor

from creditaudit.models.base import CreditNet, Forward, true_grads
from creditaudit.rules.base import RULES, NoOptions, Rule


@RULES.register(
    "bp", "backprop: a_l = g_l exactly; trained end to end by autograd (gold-standard control)"
)
class BP(Rule[NoOptions]):
    end_to_end = True
    stack_refusal = None

    def credits(self, model: CreditNet, x: Tensor, y: Tensor, fwd: Forward) -> list[Tensor]:
        _, gs = true_grads(model, x, y)
        return gs
