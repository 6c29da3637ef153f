"""``sparse_dfa`` — an example of a rule written outside creditaudit: Direct Feedback Alignment with
sparse feedback (Crafton et al. 2019, "Direct feedback alignment with sparse connections for local
learning").

Credit:  a_l = B_l e_T,  e_T = softmax(o) − onehot(y),  l = 0..L, as in ``dfa``, but each entry of
         the fixed random matrix B_l (numel(h_l) × C) is kept with probability ``density`` and the
         kept entries are scaled by 1/√density, so that B_l keeps the variance 1/C of dfa's matrices.
Update:  the shared local update (creditaudit trains the blocks from the credits).

Use it as a template:

    creditaudit train rule=examples/rules/sparse_dfa.py sparse_dfa.density=0.05
    creditaudit audit --rule examples/rules/sparse_dfa.py
    creditaudit check-rule examples/rules/sparse_dfa.py          # the conformance kit

What a rule file needs: a ``Rule`` subclass registered with ``@RULES.register(name, summary)`` (the
name is written there only), ``credits()`` returning one detached credit per state, of its shape;
random state drawn in ``setup()`` from torch's global RNG (seeded from the run's seed) and returned
by ``state_dict()``; options as a dataclass whose ``__post_init__`` checks them with
``creditaudit.rules.options``. Because the credits are a function of the model, the batch and fixed
tensors, runs of this rule can train stacked (``stack_refusal = None``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from creditaudit.models.base import CreditNet, Forward
from creditaudit.rules import RULES, Rule, RuleContext
from creditaudit.rules.options import check


@dataclass
class SparseDFAOptions:
    """How sparse the feedback matrices are."""

    density: float = field(
        default=0.1,
        metadata={"help": "fraction of the entries of each B_l kept (0 < density <= 1)"},
    )

    def __post_init__(self) -> None:
        check("density", self.density, 0 < self.density <= 1, "a number in (0, 1]")


@RULES.register(
    "sparse_dfa",
    "DFA with sparse fixed feedback: a_l = B_l e_T, a fraction density of B_l's entries kept",
)
class SparseDFA(Rule):
    Options = SparseDFAOptions
    stack_refusal = None  # credits depend on the model, the batch and fixed tensors only

    def setup(self, model: CreditNet, ctx: RuleContext) -> None:
        C, keep = ctx.num_classes, self.opts.density
        self.B = []
        for shape in ctx.state_shapes:  # drawn on the CPU from the run's seeded RNG, then moved
            n = math.prod(shape)
            mask = torch.rand(n, C) < keep
            self.B.append((torch.randn(n, C) * mask / math.sqrt(C * keep)).to(ctx.device))

    def credits(self, model: CreditNet, x: Tensor, y: Tensor, fwd: Forward) -> list[Tensor]:
        logits = fwd.logits.detach()
        e = torch.softmax(logits, dim=1) - F.one_hot(y, logits.shape[1]).to(logits.dtype)  # (B, C)
        return [
            (e.to(h.dtype) @ B.to(h.dtype).T).view_as(h)
            for B, h in zip(self.B, fwd.hs, strict=True)
        ]

    def state_dict(self) -> dict[str, Any]:
        return {"B": list(self.B)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.B[0].device if getattr(self, "B", None) else torch.device("cpu")
        self.B = [b.to(device) for b in state["B"]]
