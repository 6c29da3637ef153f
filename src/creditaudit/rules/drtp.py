"""``drtp`` — Direct Random Target Projection (Frenkel, Lefebvre & Bol 2021): the one-hot *target*,
not the error, projected straight to every state by a fixed random matrix. Forward-only: the credit
needs neither the network's output nor any pass after the forward one.

Credit:  a_l = B_l (−y*),   y* = onehot(y) (per sample, (B, C)),   l = 0..L
         B_l a fixed random matrix C -> numel(h_l) per sample, (n_l, C); B_l(−y*) is reshaped to
         the shape of h_l (a vector, a (T, d) token grid, a (c, h, w) feature map). a_0 trains the
         embedding; a_1..a_L the blocks, through the shared local update (docs/science.md §1). The terminal
         norm and the head keep their exact CE gradient, as the paper's output layer does.
Sign:    a_l ≈ g_l asks the credit to point like a gradient, and the gradient meets the target
         with a minus sign: g_l = (∂o/∂h_l)ᵀ e_T, e_T = softmax(o) − y*, whose true-class
         entry p_y − 1 is always negative — the paper's reason for calling the target a proxy for the
         error's sign. So the projected target enters as B_l(−y*): DFA's a_l = B_l e_T with e_T
         replaced by the part of it that is known before the output is (for the same B_l,
         B_l e_T = B_l p + B_l(−y*)), and the block descends along −a_l = B_l y*. The paper (and
         its code, which feeds onehot(y)·B back in place of the gradient) writes +B y*; B and −B
         have the same distribution, so the two are one rule in law, and the sign only fixes which
         matrix is called B_l.
Update:  the shared local update; DRTP trains no estimator of its own.
Matrices: the paper's: He-uniform on the (C, n_l) feedback matrix of each layer (its code calls
         ``kaiming_uniform_``, fan = n_l): U(±√(6/n_l)), variance 2/n_l, so ‖B_l y*‖² ≈ 2 per sample
         whatever the width. Here variance scale²/n_l with ``init=uniform, scale=√2`` by default;
         ``init=normal`` draws N(0, scale²/n_l). Drawn in ``setup`` in the order B_0..B_L on the
         CPU from a generator seeded from the run's seeded global RNG (``rules/_feedback.py``): a
         function of (run seed, model shapes) alone, identical on every device, and checkpointed.
Defaults: init=uniform, scale=√2 (He-uniform, as the paper).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import Tensor
from torch.nn import functional as F

from creditaudit.models.base import Forward
from creditaudit.rules._feedback import INITS
from creditaudit.rules.base import RULES
from creditaudit.rules.dfa import DirectProjectionRule
from creditaudit.rules.options import check_choice, check_positive


@dataclass
class DRTPOptions:
    """Distribution of DRTP's fixed target-projection matrices B_l (C -> shape of h_l)."""

    init: str = field(
        default="uniform",
        metadata={
            "help": (
                "distribution of the entries of B_l: uniform (the paper's He-uniform) | normal "
                "(same variance scale²/n_l)"
            )
        },
    )
    scale: float = field(
        default=math.sqrt(2.0),
        metadata={
            "help": (
                "entries of B_l have variance scale²/n_l, n_l = size of h_l (default √2: "
                "He-uniform U(±√(6/n_l)), as the paper)"
            )
        },
    )

    def __post_init__(self) -> None:
        check_choice("init", self.init, INITS)
        check_positive("scale", self.scale)


@RULES.register(
    "drtp",
    "direct random target projection: a_l = B_l(−onehot y) with fixed random B_l; no error, no backward pass",
)
class DRTP(DirectProjectionRule[DRTPOptions]):
    Options = DRTPOptions

    def fan(self, n_l: int, C: int) -> int:
        return n_l  # variance scale²/n_l: He-uniform for scale √2

    def signal(self, fwd: Forward, y: Tensor) -> Tensor:
        return -F.one_hot(y, fwd.logits.shape[1]).to(fwd.logits.dtype)  # −y*, from the labels alone
