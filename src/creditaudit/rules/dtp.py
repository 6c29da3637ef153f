"""``dtp`` — Difference Target Propagation (Lee et al. 2015; in the form analysed by Meulemans et al.
2020): learned approximate inverses g_l of the blocks carry a target for the last state down the
stack, with the difference correction; each state's credit is how far it sits from its target.

Targets:  τ_L     = h_L − η̂ g_L                          (a small gradient step on the last state;
                                                          g_L through the current norm and head)
          τ_{l−1} = h_{l−1} + g_l(τ_l) − g_l(h_l)          l = L..1 (the difference correction: τ_l = h_l
                                                          gives τ_{l−1} = h_{l−1}, exact inverse or not)
Credit:   a_l = (h_l − τ_l) / η̂,   l = 0..L   (so a_L = g_L exactly; a_0 trains the embedding).
          Fed to the shared local update, ⟨f_l(sg h_{l−1}), a_l⟩ has the gradient of DTP's layer
          loss ½‖h_l − τ_l‖²/η̂ with respect to block l's parameters: the paper's update, up to the
          1/η̂ that Meulemans et al. also fold into the learning rate. To first order
          a_{l−1} = J_{g_l} a_l: with exact inverses the targets follow the Gauss-Newton-like
          direction J_{l←L}^{-1} g_L, which agrees with g_l = J_{L←l}ᵀ g_L where the blocks' Jacobians
          are near-orthogonal (near-identity residual blocks, orthogonal layers).
          Computed on displacements δ_l = τ_l − h_l (δ_{l−1} = g_l(h_l + δ_l) − g_l(h_l), the
          identity part of a residual inverse exactly), so a step η̂ of 1e-3 is not lost in the
          float32 rounding of an O(1) state.
Inverses: one g_l per block, h_l's shape -> h_{l−1}'s, g_l(h) = s·h + Out(tanh(In(h))), with
          s = 1 for a residual block (its skip path inverted by the identity; Out starts at 0, so
          g_l starts as the exact inverse of a block whose branch is 0) and s = 0 otherwise:
            vectors (d,)     In, Out Linear (d -> d -> size of h_{l−1}, reshaped: smallcnn's FC stage)
            tokens (T, d)    In, Out Linear on each token, and a learned T×T token mixing between
                             them (starting at I) so that credit can leave the cls token
            maps (c, H, W)   In a 1×1 conv, Out a transposed conv with stride = the upsampling factor
            or (c, T)        (smallcnn's and smallcnn1d's conv+pool stages; sizes that pooling
                             floored are restored by output padding); a (T, d) state of the same
                             shape as the one below it is read as tokens
          a one-hidden-layer, tanh mirror of each block (Lee et al.'s g = tanh(V h + c), with a
          linear read-out because the states here are not tanh-bounded). Other shape changes are
          refused when the rule is set up, naming the shapes.
Training: after each model step, on the detached states of the batch, each inverse learns to undo
          its CURRENT block on a corrupted input (Lee et al.'s noise-injected reconstruction):
              loss = Σ_l mean ‖g_l(F_l(h_{l−1} + σε)) − (h_{l−1} + σε)‖²,  ε ~ N(0, I)
          (F_l the block, no parameter gradient, BatchNorm's running statistics untouched; ε from
          the rule's own generator), one Adam step (own optimizer, ``fb_lr``). Metric
          ``rule/rec_loss`` = that loss per block.
Defaults: the DTP configuration Meulemans et al. 2020 publish for MNIST (Adam on the feedback
          parameters, lr 1.96e-3; σ = 0.0837; feedback activation tanh; target step 0.2195 on the
          batch-mean loss at batch 128, here η̂ = 0.2195/128 ≈ 1.7e-3 on the per-sample loss, since
          g_L is per sample; no feedback pre-training epochs). The forward optimizer is the study's
          (AdamW), not their Adam with lr/η̂. Inverses are drawn on the CPU from a seed that
          ``setup`` takes from the run's seeded global RNG (a function of the run seed and the
          shapes alone), and checkpointed with their optimizer and noise generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from creditaudit.errors import ConfigError
from creditaudit.models.base import CreditNet, Forward, preserved_buffers
from creditaudit.rules._estimator import NetworkRule, terminal_loss_and_grad
from creditaudit.rules.base import RULES, RuleContext
from creditaudit.rules.options import check_positive


@dataclass
class DTPOptions:
    """Output target step, and how the inverses g_l are trained."""

    target_step: float = field(
        default=0.2195 / 128,
        metadata={
            "help": (
                "η̂: the last state's target τ_L = h_L − η̂ g_L (per-sample g); default "
                "0.2195/128 (Meulemans et al. 2020, batch-mean loss)"
            )
        },
    )
    sigma: float = field(
        default=0.0837,
        metadata={
            "help": "std of the Gaussian noise on h_{l-1} in the inverses' reconstruction loss"
        },
    )
    fb_lr: float = field(
        default=1.96e-3, metadata={"help": "learning rate of the inverses' own Adam (constant)"}
    )

    def __post_init__(self) -> None:
        for name in ("target_step", "sigma", "fb_lr"):
            check_positive(name, getattr(self, name))


class Inverse(nn.Module):
    """g_l: a state of ``shape`` (h_l, per sample) -> ``target`` (h_{l−1}): s·h + Out(tanh(In(h)))."""

    def __init__(self, shape: tuple[int, ...], target: tuple[int, ...], residual: bool):
        super().__init__()
        self.target = tuple(target)
        self.skip = residual and tuple(shape) == self.target
        self.mix: nn.Parameter | None = None
        self.inp: nn.Linear | nn.Conv1d | nn.Conv2d
        self.out: nn.Linear | nn.ConvTranspose1d | nn.ConvTranspose2d
        up = (
            _upsampling(shape, target)
            if len(shape) in (2, 3) and len(target) == len(shape)
            else None
        )
        if len(shape) == 1:  # vectors (d,) -> anything, read out flat
            self.inp, self.out = (
                nn.Linear(shape[0], shape[0]),
                nn.Linear(shape[0], math.prod(target)),
            )
        elif (
            len(shape) == 2 and tuple(shape) == self.target
        ):  # tokens (T, d), per token + T×T mixing
            T, d = shape
            self.inp, self.out = nn.Linear(d, d), nn.Linear(d, d)
            self.mix = nn.Parameter(torch.eye(T))
        elif up is not None:  # maps (C, T) or (C, H, W)
            stride, pad = up
            if len(shape) == 2:
                self.inp = nn.Conv1d(shape[0], shape[0], 1)
                self.out = nn.ConvTranspose1d(
                    shape[0], target[0], stride, stride=stride, output_padding=pad[0]
                )
            else:
                self.inp = nn.Conv2d(shape[0], shape[0], 1)
                self.out = nn.ConvTranspose2d(
                    shape[0], target[0], stride, stride=stride, output_padding=(pad[0], pad[1])
                )
        else:
            raise ConfigError(
                f"dtp: no inverse for a block from states of shape {tuple(target)} to {tuple(shape)} "
                "(dtp inverts vectors, token grids of one shape, and feature maps upsampled by an integer factor)"
            )
        if self.skip:  # the exact inverse of a residual block whose branch is 0
            for p in self.out.parameters():  # weight and bias
                nn.init.zeros_(p)

    def branch(self, h: Tensor) -> Tensor:
        u = torch.tanh(self.inp(h))
        if self.mix is not None:
            u = torch.einsum("st,btd->bsd", self.mix, u)
        return self.out(u).view(-1, *self.target)

    def forward(self, h: Tensor) -> Tensor:
        r = self.branch(h)
        return h + r if self.skip else r

    def difference(self, h: Tensor, delta: Tensor) -> Tensor:
        """g(h + δ) − g(h), with a residual inverse's identity part exact."""
        d = self.branch(h + delta) - self.branch(h)
        return delta + d if self.skip else d


def _upsampling(
    shape: tuple[int, ...], target: tuple[int, ...]
) -> tuple[int, tuple[int, ...]] | None:
    """(stride, output padding) of a transposed conv from (c, *size) to (c', *size'), every spatial
    axis upsampled by the same integer stride, or None."""
    stride = target[1] // shape[1]
    if stride < 1 or any(t // n != stride for n, t in zip(shape[1:], target[1:], strict=True)):
        return None
    pad = tuple(t - stride * n for n, t in zip(shape[1:], target[1:], strict=True))
    return (stride, pad) if all(0 <= p < stride for p in pad) else None


@RULES.register(
    "dtp",
    "difference target propagation: learned inverses g_l carry τ_L = h_L − η̂ g_L down; a_l = (h_l − τ_l)/η̂",
)
class DTP(NetworkRule[DTPOptions, nn.ModuleList]):
    """The inverses g_1..g_L are the estimator (``self.net``; ``net[l-1]`` maps h_l -> h_{l−1}),
    built, trained and checkpointed by the :class:`NetworkRule` skeleton, with Adam at ``fb_lr``."""

    Options = DTPOptions
    stack_refusal = "trains its inverse maps, with their own optimizer, in every step"

    # -- building --------------------------------------------------------------------------------
    def setup(self, model: CreditNet, ctx: RuleContext) -> None:
        self.residual = [bool(b.residual) for b in model.blocks]
        super().setup(model, ctx)

    def build(self, shapes: list[tuple[int, ...]]) -> nn.ModuleList:
        return nn.ModuleList(
            Inverse(shapes[l], shapes[l - 1], self.residual[l - 1]) for l in range(1, len(shapes))
        )

    def optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer | None:
        return (
            torch.optim.Adam(params, lr=self.opts.fb_lr) if params else None
        )  # L = 0: nothing to invert

    # -- credits ---------------------------------------------------------------------------------
    def displacements(self, model: CreditNet, hs: list[Tensor], y: Tensor) -> list[Tensor]:
        """δ_l = τ_l − h_l for l = 0..L (float32)."""
        eta = self.opts.target_step
        g_L = terminal_loss_and_grad(model, hs[-1], y)[1]
        deltas = [-eta * g_L.float()]
        inverses = self.built()
        with torch.no_grad():
            for l in range(len(hs) - 1, 0, -1):  # δ_{l−1} = g_l(h_l + δ_l) − g_l(h_l)
                g_l = inverses[l - 1]  # an Inverse, or any module with its difference()
                deltas.insert(0, g_l.difference(hs[l].float(), deltas[0]))  # type: ignore[operator]  # Module.__getattr__
        return deltas

    def credits(self, model: CreditNet, x: Tensor, y: Tensor, fwd: Forward) -> list[Tensor]:
        hs = [h.detach() for h in fwd.hs]
        self.ready(hs)
        deltas = self.displacements(model, hs, y)
        return [(-d / self.opts.target_step).to(h.dtype) for d, h in zip(deltas, hs, strict=True)]

    # -- training the inverses -------------------------------------------------------------------
    def step(self, model: CreditNet, x: Tensor, y: Tensor, fwd: Forward) -> dict[str, Tensor]:
        hs = [h.detach().float() for h in fwd.hs]
        self.ready(hs)
        if self.opt is None:  # no blocks (L = 0): nothing to invert
            return {}
        noisy = [
            h + self.opts.sigma * torch.randn(h.shape, generator=self.gen, device=h.device)
            for h in hs[:-1]
        ]
        with torch.no_grad(), preserved_buffers(model):
            outs = [
                block(u.to(fwd.hs[l].dtype))[0].float()
                for l, (block, u) in enumerate(zip(model.blocks, noisy, strict=True))
            ]
        per_block = torch.stack(
            [F.mse_loss(g(o), u) for g, o, u in zip(self.built(), outs, noisy, strict=True)]
        )
        self.train_on(per_block.sum())
        return {"rec_loss": per_block.mean().detach()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (
            "inverses" in state
        ):  # a checkpoint written before the inverses lived in the estimator skeleton
            state = {**state, "net": state["inverses"]}
        super().load_state_dict(state)
