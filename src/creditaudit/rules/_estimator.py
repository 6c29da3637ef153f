"""What the learned credit estimators (``sb``, ``cb``, ``vec``) share: how an estimator sees a
state, the conditioned trunk, running the rest of the model from a state, EMA targets, and the
bookkeeping (own optimizer, own random generator) that makes them checkpointable.

Conditioning. An estimator sees three things about a state h_l of block index l:

    LN(h_l)   the whole state flattened per sample, (B, D_l), normalised by a LayerNorm without
              affine parameters. Over the *flattened* state (not the last dim) so that one choice
              fits every shape: (B, d) for MLPs, (B, C, H, W) for smallcnn, (B, T, d) for vit_mini.
              Credits are gradients (or outputs rescaled, see ``vec``) taken *through* this LN, so
              they scale like 1/‖h_l‖, as the true gradient does behind a terminal LayerNorm.
    τ(l)      a learned vector per block index l = 0..L (an ``nn.Embedding``).
    s         the terminal code: e_T = softmax(o) − onehot(y) (``code=error``, default) or
              onehot(y) (``code=label``), C-dim, detached.

The trunk: z = MLP(A_l(LN h_l) + τ(l)), with a per-layer input adapter A_l = Linear(D_l, width)
(states of different layers may differ in shape) and a shared MLP (``depth`` × [Linear(width,
width), GELU] after a GELU). One estimator serves all L+1 states, which pass the trunk as one
concatenated batch. How s enters is each rule's choice, documented there: ``sb`` adds W_s s to the
trunk's input; ``cb`` and ``vec`` keep s out of the trunk and contract the features with it, so that
their credit is linear in s — the form of every true gradient, g_l = (∂o/∂h_l)ᵀ e_T — and vanishes
with e_T on a sample the model already fits (with s in the trunk, a value net can read the loss off
e_T alone, CE_i = −log(1 + e_T,i[y_i]), and learn nothing about h).

Estimators are float32, built on the CPU from a seed that ``setup`` draws from the global RNG
(see :class:`NetworkRule`), then moved to ``ctx.device``; states are cast to float32 on the way
in and credits are returned in the dtype of the states.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from creditaudit.models.base import CreditNet
from creditaudit.rules.base import OptionsT, Rule, RuleContext
from creditaudit.rules.options import check_at_least, check_choice, check_positive

CODES = ("error", "label")

ModuleT = TypeVar("ModuleT", bound=nn.Module)
#: the network a :class:`NetworkRule` trains (what its ``build`` returns)
NetT = TypeVar("NetT", bound=nn.Module)


@dataclass
class EstimatorOptions:
    """Options every learned estimator has."""

    est_lr: float = field(
        default=1e-3,
        metadata={
            "help": "learning rate of the estimator's own AdamW (weight decay 0.01, constant schedule)"
        },
    )
    width: int = field(
        default=128,
        metadata={
            "help": "estimator width: per-layer input adapters Linear(D_l, width) feed a shared trunk of this width"
        },
    )
    depth: int = field(
        default=1,
        metadata={"help": "hidden Linear(width, width) layers of the shared trunk (GELU between)"},
    )
    code: str = field(
        default="error",
        metadata={
            "help": "terminal conditioning code s: error (e_T = softmax(o) - onehot(y)) | label (onehot(y))"
        },
    )

    def __post_init__(self) -> None:
        check_choice("code", self.code, CODES)
        check_positive("est_lr", self.est_lr)
        check_at_least("width", self.width, 1)
        check_at_least("depth", self.depth, 0)


# ---------------------------------------------------------------------------------------------
# Per-sample helpers
# ---------------------------------------------------------------------------------------------
def flat_ln(h: Tensor) -> Tensor:
    """LayerNorm without affine parameters over the flattened state: (B, ...) -> (B, D)."""
    f = h.flatten(1)
    return F.layer_norm(f, f.shape[1:])


def rms(h: Tensor) -> Tensor:
    """Per-sample root-mean-square over all features, (B, ...) -> (B,), floored at 1e-6."""
    return (h.flatten(1).pow(2).mean(1) + 1e-12).sqrt()


def expand_like(v: Tensor, h: Tensor) -> Tensor:
    """(B,) -> (B, 1, ..., 1) to broadcast against a state h of shape (B, ...)."""
    return v.view(-1, *[1] * (h.dim() - 1))


def terminal_code(kind: str, logits: Tensor, y: Tensor) -> Tensor:
    """The conditioning code s, (B, C), detached: e_T = softmax(o) − onehot(y), or onehot(y)."""
    onehot = F.one_hot(y, logits.shape[1]).to(torch.float32)
    if kind == "label":
        return onehot
    return logits.detach().float().softmax(1) - onehot


def per_sample_cosine(a: Tensor, b: Tensor) -> Tensor:
    """cos(a_i, b_i) over flattened features, (B,), without an eps clamp: the denominator is floored
    only at the dtype's smallest normal number (so a zero vector gives 0, not nan)."""
    a, b = a.flatten(1), b.flatten(1)
    tiny = torch.finfo(a.dtype).tiny
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(tiny)


# ---------------------------------------------------------------------------------------------
# Running the model from a state
# ---------------------------------------------------------------------------------------------
def terminal_loss_and_grad(model: CreditNet, h_L: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample CE_i of the current readout at h_L, (B,), and g_L = d CE_i / d h_L (the shape of
    h_L), both detached. Only the state gets a gradient (no parameter .grad is touched)."""
    with torch.enable_grad():
        h = h_L.detach().requires_grad_(True)
        ce = F.cross_entropy(model.readout(h), y, reduction="none")
        (g,) = torch.autograd.grad(ce.sum(), h)
    return ce.detach(), g.detach()


# ---------------------------------------------------------------------------------------------
# The conditioned trunk
# ---------------------------------------------------------------------------------------------
class Estimator(nn.Module):
    """Per-layer input adapters, τ(l), optionally the code s (added at the input), and a shared
    MLP trunk: features z = MLP(A_l(LN h_l) + τ(l) [+ W_s s]), (N, width)."""

    def __init__(self, state_dims: list[int], width: int, depth: int, code_dim: int | None = None):
        super().__init__()
        self.adapters = nn.ModuleList(nn.Linear(D, width) for D in state_dims)
        self.tau = nn.Embedding(len(state_dims), width)  # τ(l), l = 0..L
        nn.init.normal_(self.tau.weight, std=0.02)
        self.code_in = nn.Linear(code_dim, width, bias=False) if code_dim else None
        layers: list[nn.Module] = [nn.GELU()]
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.GELU()]
        self.trunk = nn.Sequential(*layers)

    def features(
        self, states: list[Tensor], layers: list[int], code: Tensor | None = None
    ) -> list[Tensor]:
        """Features (N_i, width) of each state ``states[i]`` (N_i, ...) of block index
        ``layers[i]``. With a code input, ``code`` is (B, C) and every N_i a multiple k·B of B (k
        stacked copies of the batch; the code is repeated). All states pass the trunk as one batch."""
        s_in = self.code_in(code) if self.code_in is not None else None  # (B, width)
        us = []
        for h, l in zip(states, layers, strict=True):
            u = self.adapters[l](flat_ln(h.float())) + self.tau.weight[l]
            if s_in is not None:
                u = u + s_in.repeat(h.shape[0] // s_in.shape[0], 1)
            us.append(u)
        z = self.trunk(torch.cat(us))
        return list(z.split([u.shape[0] for u in us]))


# ---------------------------------------------------------------------------------------------
# EMA targets
# ---------------------------------------------------------------------------------------------
def ema_copy(module: ModuleT) -> ModuleT:
    """A frozen copy of ``module`` to be tracked by :func:`ema_update`."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, decay: float) -> None:
    """θ̄ ← decay·θ̄ + (1 − decay)·θ for every parameter (buffers copied)."""
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), 1.0 - decay)
    for tb, sb in zip(target.buffers(), source.buffers(), strict=True):
        tb.copy_(sb)


# ---------------------------------------------------------------------------------------------
# The rule skeleton: build from the run seed, own optimizer and generator, checkpoint state
# ---------------------------------------------------------------------------------------------
class NetworkRule(Rule[OptionsT], Generic[OptionsT, NetT]):
    """A rule that trains a network of its own (an estimator, ``dtp``'s inverse maps). Subclasses
    implement :meth:`build` (the trainable modules for the given state shapes), :meth:`optimizer`,
    ``credits`` and ``step``.

    ``setup`` draws one seed from torch's global CPU RNG (seeded from the run seed right before
    the model was built) and builds the estimator from it, on the CPU under a forked RNG, for the
    state shapes of ``ctx.state_shapes``: the estimator is a function of (run seed, model shapes)
    alone, whatever the device. A context without shapes (a hand-made one) defers the build to
    the first batch (:meth:`ready`), with the same result. The rule's own random stream
    (``self.gen``, on ``ctx.device``; noise and random directions) comes from the same seed.
    ``state_dict`` holds the shapes, the estimator, its optimizer, the generator and a step count.
    The learned estimators (``sb``, ``cb``, ``vec``) build on it as :class:`EstimatorRule`;
    ``dtp``'s inverse maps live in this skeleton too, with options and an optimizer of their own.
    """

    stack_refusal = "trains an estimator of its own, with its own optimizer, in every step"

    def setup(self, model: CreditNet, ctx: RuleContext) -> None:
        self.ctx = ctx
        self.seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        self.gen = torch.Generator(device=ctx.device)
        self.gen.manual_seed(self.seed + 1)
        self.shapes: list[tuple[int, ...]] = []  # per-sample shapes of h_0..h_L, once built
        self.net: NetT | None = None
        self.opt: torch.optim.Optimizer | None = None
        self.steps = 0  # estimator steps taken
        if ctx.state_shapes:
            self._build(list(ctx.state_shapes))

    def build(self, shapes: list[tuple[int, ...]]) -> NetT:
        """The trainable modules for per-sample state shapes h_0..h_L (drawn from the global RNG)."""
        raise NotImplementedError

    def after_build(self) -> None:
        """Hook: extra state made from the built estimator (EMA targets, fixed matrices)."""

    def ready(self, fwd_hs: list[Tensor]) -> NetT:
        """The estimator, built now if ``setup`` could not (its context gave no state shapes)."""
        if self.net is None:
            return self._build([tuple(h.shape[1:]) for h in fwd_hs])
        return self.net

    def built(self) -> NetT:
        """The estimator (an error before it is built: call :meth:`ready` first)."""
        if self.net is None:
            raise RuntimeError(f"{self.name}: the estimator is built in setup() or by ready(hs)")
        return self.net

    def _build(self, shapes: list[tuple[int, ...]]) -> NetT:
        if not hasattr(self, "ctx"):
            raise RuntimeError(f"{self.name}: call setup(model, ctx) before using the rule")
        self.shapes = [tuple(int(n) for n in s) for s in shapes]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            net = self.build(self.shapes).to(self.ctx.device)
            self.net = net
            self.opt = self.optimizer(list(net.parameters()))
            self.after_build()
        return net

    def optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer | None:
        """The estimator's own optimizer (None when it has nothing to train)."""
        raise NotImplementedError

    def train_on(self, loss: Tensor) -> None:
        """One optimizer step of the estimator on ``loss``."""
        if self.opt is None:
            raise RuntimeError(f"{self.name}: the estimator has nothing to train")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.steps += 1

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "seed": self.seed,
            "steps": self.steps,
            "gen": self.gen.get_state(),
        }
        if self.net is not None:
            state.update(
                shapes=[list(s) for s in self.shapes],
                net=self.net.state_dict(),
                opt=self.opt.state_dict() if self.opt is not None else {},
                **self.extra_state(),
            )
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.steps = int(state["seed"]), int(state["steps"])
        self.gen.set_state(state["gen"].to("cpu", torch.uint8))
        if "shapes" in state:
            net = self._build([tuple(s) for s in state["shapes"]])
            net.load_state_dict(state["net"])
            if self.opt is not None:
                self.opt.load_state_dict(state["opt"])
            self.load_extra_state(state)


EstimatorOptionsT = TypeVar("EstimatorOptionsT", bound=EstimatorOptions)


class EstimatorRule(NetworkRule[EstimatorOptionsT, NetT]):
    """A rule with a learned credit estimator (``sb``, ``cb``, ``vec``): its options extend
    :class:`EstimatorOptions`, and the estimator trains with AdamW at ``est_lr``."""

    Options = EstimatorOptions

    def optimizer(self, params: list[nn.Parameter]) -> torch.optim.Optimizer | None:
        """AdamW at ``est_lr``, weight decay 0.01, constant schedule."""
        return torch.optim.AdamW(params, lr=self.opts.est_lr, weight_decay=0.01)


def normalised_sq_error(p: Tensor, t: Tensor) -> Tensor:
    """mean_i ‖p_i − t_i‖² / (‖t_i‖² + 1e-3·mean_k ‖t_k‖² + tiny) for (B, K) predictions and
    targets: scale-free per sample, with a floor relative to the batch so that a sample whose
    target is ~0 does not dominate."""
    tt = t.pow(2).sum(1)
    denom = tt + 1e-3 * tt.mean() + torch.finfo(t.dtype).tiny
    return ((p - t).pow(2).sum(1) / denom).mean()
