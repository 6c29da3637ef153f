"""``dfa`` — Direct Feedback Alignment (Nøkland 2016): the output error, projected straight to every
state by a fixed random matrix.

Credit:  a_l = B_l e_T,  e_T = softmax(o) − onehot(y) (per sample, (B, C)),  l = 0..L.
         B_l is a fixed random matrix C -> numel(h_l) per sample, (n_l, C); B_l e_T is reshaped to
         the shape of h_l (a vector, a (T, d) token grid, a (c, h, w) feature map). a_0 trains the
         embedding; a_1..a_L the blocks, through the shared local update (docs/science.md §1).
Update:  the shared local update; DFA trains no estimator of its own.
Matrices: entries i.i.d. with variance scale²/C — default ``init=normal, scale=1``: N(0, 1/C), so
         ‖B_l e‖² ≈ (n_l/C)·‖e‖²; ``init=uniform`` draws U(±scale·√(3/C)) (same variance, the
         uniform family of Nøkland 2016). They are drawn in ``setup``, in the order B_0..B_L, on the
         CPU from a generator seeded from the run's seeded global RNG (``rules/_feedback.py``): a
         function of (run seed, model shapes) alone, identical on every device, and checkpointed.
Defaults: init=normal, scale=1.0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor

from creditaudit.models.base import CreditNet, Forward
from creditaudit.rules._feedback import INITS, feedback_generator, output_error, random_matrix
from creditaudit.rules.base import RULES, Rule, RuleContext
from creditaudit.rules.options import check_choice, check_positive


@dataclass
class DFAOptions:
    """Distribution of DFA's fixed feedback matrices B_l (C -> shape of h_l)."""

    init: str = field(
        default="normal",
        metadata={
            "help": "distribution of the entries of B_l: normal | uniform (same variance scale²/C)"
        },
    )
    scale: float = field(
        default=1.0, metadata={"help": "entries of B_l have variance scale²/C (default: N(0, 1/C))"}
    )

    def __post_init__(self) -> None:
        check_choice("init", self.init, INITS)
        check_positive("scale", self.scale)


class ProjectionOptions(Protocol):
    """What :class:`DirectProjectionRule` reads of its subclass's options."""

    init: str  # one of INITS
    scale: float


ProjectionOptionsT = TypeVar("ProjectionOptionsT", bound=ProjectionOptions)


class DirectProjectionRule(Rule[ProjectionOptionsT]):
    """a_l = B_l s for a per-sample signal s (B, C) and fixed random B_l (n_l, C), l = 0..L,
    reshaped to the shape of h_l: ``dfa`` (s = e_T) and ``drtp`` (s = −onehot y). Subclasses give
    the signal and the fan of B_l's variance scale²/fan; the matrices are drawn in ``setup`` in the
    order B_0..B_L from the run's feedback generator, and checkpointed."""

    stack_refusal = None

    def __init__(self, options: ProjectionOptionsT | None = None):
        super().__init__(options)
        self.device = torch.device("cpu")
        self.seed: int | None = None
        self.B: list[Tensor] = []  # B_0..B_L, each (n_l, C), float32, on self.device

    def fan(self, n_l: int, C: int) -> int:
        raise NotImplementedError

    def signal(self, fwd: Forward, y: Tensor) -> Tensor:
        """The per-sample signal s, (B, C)."""
        raise NotImplementedError

    def setup(self, model: CreditNet, ctx: RuleContext) -> None:
        """Draw B_0..B_L for the per-sample state shapes ``ctx.state_shapes``."""
        self.device = ctx.device
        self.seed, g = feedback_generator()
        C = ctx.num_classes
        self.B = [
            random_matrix(
                (math.prod(s), C), self.fan(math.prod(s), C), self.opts.init, self.opts.scale, g
            ).to(self.device)
            for s in ctx.state_shapes
        ]

    def credits(self, model: CreditNet, x: Tensor, y: Tensor, fwd: Forward) -> list[Tensor]:
        s = self.signal(fwd, y)  # (B, C)
        if len(self.B) != len(fwd.hs):
            raise ValueError(
                f"{self.name} holds {len(self.B)} feedback matrices but the model has {len(fwd.hs)} states"
            )
        out = []
        for l, (B, h) in enumerate(zip(self.B, fwd.hs, strict=True)):
            if B.shape != (h[0].numel(), s.shape[1]):
                raise ValueError(
                    f"{self.name}: B_{l} has shape {tuple(B.shape)} but h_{l} needs ({h[0].numel()}, {s.shape[1]})"
                )
            out.append((s.to(h.dtype) @ B.to(h.dtype).T).view_as(h))  # (B, n_l) -> shape of h_l
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "B": list(self.B)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = state["seed"]
        self.B = [b.to(self.device, torch.float32) for b in state["B"]]


@RULES.register(
    "dfa",
    "direct feedback alignment: a_l = B_l e_T with fixed random B_l (C -> shape of h_l), l = 0..L",
)
class DFA(DirectProjectionRule[DFAOptions]):
    Options = DFAOptions

    def fan(self, n_l: int, C: int) -> int:
        return C  # variance scale²/C

    def signal(self, fwd: Forward, y: Tensor) -> Tensor:
        return output_error(fwd.logits, y)  # e_T
