"""``fa`` — block-level Feedback Alignment (Lillicrap et al. 2016, at the granularity of blocks, as in
the seed study): the output error travels down the stack through fixed random matrices.

Credit:  a_L     = J_N(h_L)ᵀ (B_H e_T),   e_T = softmax(o) − onehot(y) (per sample)
         a_{l−1} = B_l a_l                 l = L..1   (default, the seed's formula)
         a_{l−1} = a_l + B_l a_l           with ``identity=True``, for residual blocks only: mirrors
                                           the residual Jacobian I + J_f (a non-residual block keeps
                                           a_{l−1} = B_l a_l)
         B_H is a fixed random C -> (shape of N's output) matrix used in place of the head's
         transpose; J_N is the terminal norm's *true* local Jacobian, applied as an autograd
         vector-Jacobian product (``creditaudit.autodiff``) through ``model.norm`` at sg(h_L)
         (LayerNorm, vit_mini's LN of the
         cls token — which sends credit to token 0 only —, or the identity).
Block maps B_l (shape of h_l -> shape of h_{l−1}), ``structure``:
         dense  one (n_{l−1} × n_l) matrix on the flattened per-sample states (vectors (B, d): d×d;
                smallcnn, whose states change shape: flat(h_l) -> flat(h_{l−1}));
         kron   for states with the same number of axes, one random matrix per axis, i.e. the
                Kronecker product of the per-axis matrices: for tokens (B, T, d),
                a_{l−1} = M_l a_l D_lᵀ with M_l (T×T) mixing tokens, so credit reaches every token,
                and D_l (d×d) — instead of a (T·d)² dense matrix;
         auto   (default) dense when the shapes of h_l and h_{l−1} differ, kron when they are equal
                (which is dense for vectors and per-axis for token grids).
Update:  the shared local update (docs/science.md §1); FA trains no estimator of its own.
Matrices: entries i.i.d. with variance scale²/fan, fan = the input size of the map (C for B_H, n_l
         for a dense B_l; each Kronecker factor its own axis length, so the product also has
         variance scale²/n_l): default ``init=normal, scale=1`` — N(0, 1/C) for B_H and N(0, 1/d) for
         a d×d B_l, which keeps ‖a_l‖ about constant with depth; ``init=uniform`` has the same
         variance. Drawn in the order B_H, B_1..B_L (each its factors in axis order), on the CPU from
         a generator seeded in ``setup`` from the run's seeded global RNG (``rules/_feedback.py``):
         a function of (run seed, model shapes) alone, identical on every device, and checkpointed.
Defaults: init=normal, scale=1.0, identity=False, structure=auto.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from creditaudit import autodiff
from creditaudit.errors import ConfigError
from creditaudit.models.base import CreditNet, Forward
from creditaudit.rules._feedback import (
    INITS,
    feedback_generator,
    output_error,
    preserved_buffers,
    random_matrix,
)
from creditaudit.rules.base import RULES, Rule, RuleContext
from creditaudit.rules.options import check_choice, check_positive

STRUCTURES = ("auto", "dense", "kron")


@dataclass
class FAOptions:
    """Fixed feedback matrices of block-level FA and whether the identity path is part of the map."""

    init: str = field(
        default="normal",
        metadata={
            "help": (
                "distribution of the feedback entries: normal | uniform (same variance "
                "scale²/fan, fan = the map's input size)"
            )
        },
    )
    scale: float = field(
        default=1.0,
        metadata={
            "help": "feedback entries have variance scale²/fan (default: N(0, 1/C) for B_H, N(0, 1/d) for a d×d B_l)"
        },
    )
    identity: bool = field(
        default=False,
        metadata={
            "help": (
                "residual blocks propagate a_{l-1} = a_l + B_l a_l (mirrors I + J_f) instead of "
                "the seed's a_{l-1} = B_l a_l"
            )
        },
    )
    structure: str = field(
        default="auto",
        metadata={
            "help": (
                "block maps B_l: dense (one matrix on flattened states) | kron (one matrix per "
                "axis, e.g. T×T tokens ⊗ d×d) | auto (dense when shapes differ, kron when equal)"
            )
        },
    )

    def __post_init__(self) -> None:
        check_choice("init", self.init, INITS)
        check_positive("scale", self.scale)
        check_choice("structure", self.structure, STRUCTURES)


def apply_map(factors: list[Tensor], a: Tensor, out_shape: tuple[int, ...]) -> Tensor:
    """B a for a batch a (B, *in_shape): one factor = a dense matrix (n_out, n_in) on the flattened
    state; k factors = one (out_i, in_i) matrix per axis of the state (their Kronecker product)."""
    if len(factors) == 1:
        M = factors[0].to(a.dtype)
        return (a.flatten(1) @ M.T).view(a.shape[0], *out_shape)
    for axis, M in enumerate(factors, start=1):
        # contract axis `axis` of a with M's input index, put the new index back in its place
        a = torch.movedim(torch.tensordot(a, M.to(a.dtype), dims=([axis], [1])), -1, axis)
    return a.contiguous()


@RULES.register(
    "fa",
    "block-level feedback alignment: a_L = J_N^T B_H e_T, a_{l-1} = B_l a_l with fixed random B",
)
class FA(Rule[FAOptions]):
    Options = FAOptions
    stack_refusal = None

    def __init__(self, options: FAOptions | None = None):
        super().__init__(options)
        self.device = torch.device("cpu")
        self.seed: int | None = None
        self.head: Tensor | None = None  # B_H: (numel of N's output, C)
        self.blocks: list[list[Tensor]] = []  # B_1..B_L, each a list of factors (see apply_map)

    def setup(self, model: CreditNet, ctx: RuleContext) -> None:
        self.device = ctx.device
        shapes = list(ctx.state_shapes)
        if self.opts.structure != "auto" and self._layout(
            self.opts.structure, shapes
        ) == self._layout("auto", shapes):
            raise ConfigError(
                f"fa.structure={self.opts.structure} has no effect here: with these state shapes "
                f"({', '.join(str(s) for s in shapes)}) the block maps come out as with structure=auto; drop it"
            )
        self.materialize(shapes, ctx.norm_shape, ctx.num_classes)

    # -------------------------------------------------------------------------------------------
    # the fixed random matrices
    # -------------------------------------------------------------------------------------------
    def _structure(
        self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], structure: str | None = None
    ) -> str:
        s = structure or self.opts.structure
        if s == "auto":
            s = "kron" if in_shape == out_shape else "dense"
        if s == "kron" and (len(in_shape) != len(out_shape) or len(in_shape) == 1):
            # a vector state feeding a feature map has no axis-by-axis correspondence; one axis: the
            # same map
            s = "dense"
        return s

    def _layout(self, structure: str, shapes: list[tuple[int, ...]]) -> list[str]:
        return [self._structure(shapes[l], shapes[l - 1], structure) for l in range(1, len(shapes))]

    def materialize(
        self, state_shapes: list[tuple[int, ...]], norm_out_shape: tuple[int, ...], num_classes: int
    ) -> None:
        """Draw B_H and B_1..B_L for per-sample state shapes h_0..h_L, in that order."""
        self.seed, g = feedback_generator()
        init, scale = self.opts.init, self.opts.scale
        self.head = random_matrix(
            (math.prod(norm_out_shape), num_classes), num_classes, init, scale, g
        ).to(self.device)
        self.blocks = []
        for l in range(1, len(state_shapes)):
            in_shape, out_shape = state_shapes[l], state_shapes[l - 1]  # B_l: h_l -> h_{l-1}
            if self._structure(in_shape, out_shape) == "dense":
                n_in = math.prod(in_shape)
                factors = [random_matrix((math.prod(out_shape), n_in), n_in, init, scale, g)]
            else:
                # per-axis factors with variance 1/in_i each and the scale on the last one, so that
                # their Kronecker product has variance scale²/n_in like a dense map
                factors = [
                    random_matrix((o, i), i, init, scale if k == len(in_shape) - 1 else 1.0, g)
                    for k, (i, o) in enumerate(zip(in_shape, out_shape, strict=True))
                ]
            self.blocks.append([f.to(self.device) for f in factors])

    # -------------------------------------------------------------------------------------------
    # credits
    # -------------------------------------------------------------------------------------------
    def credits(self, model: CreditNet, x: Tensor, y: Tensor, fwd: Forward) -> list[Tensor]:
        e = output_error(fwd.logits, y)  # (B, C)
        if self.head is None:
            raise RuntimeError("fa: call setup(model, ctx) before asking for credits")
        if len(self.blocks) != model.L:
            raise ValueError(
                f"fa holds {len(self.blocks)} block maps but the model has {model.L} blocks"
            )
        with preserved_buffers(model.norm):
            z, norm_vjp = autodiff.vjp(model.norm, fwd.hs[-1])  # N's output, e.g. (B, d)
        v = (e.to(z.dtype) @ self.head.to(z.dtype).T).view_as(z)  # B_H e_T, shape of N's output
        (a,) = norm_vjp(v)  # J_N(h_L)^T B_H e_T: the norm's true local VJP
        credits = [a]
        for l in range(model.L, 0, -1):
            h_prev = fwd.hs[l - 1]
            b = apply_map(self.blocks[l - 1], a, tuple(h_prev.shape[1:]))
            if self.opts.identity and model.blocks[l - 1].residual and b.shape == a.shape:
                b = a + b  # (I + B_l) a_l, mirroring the residual Jacobian I + J_f
            a = b
            credits.append(a)
        return credits[::-1]  # a_0..a_L

    # -------------------------------------------------------------------------------------------
    # checkpoints
    # -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "head": [self.head] if self.head is not None else [],
            "blocks": [list(f) for f in self.blocks],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = state["seed"]
        head = state.get("head") or []
        self.head = head[0].to(self.device, torch.float32) if head else None
        self.blocks = [
            [f.to(self.device, torch.float32) for f in factors]
            for factors in state.get("blocks", [])
        ]
