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

The trunk: u = A_l(LN h_l) + τ(l) + W_s s, with a per-layer input adapter A_l = Linear(D_l, width)
(states of different layers may differ in shape); z = MLP(u) (``depth`` × [GELU, Linear(width,
width)], then GELU); the features are z ⊙ (1 + W_g s). The code enters twice — additively at the
input and as a multiplicative gate on the features — so that an estimator can represent a credit
that is linear in the output error (a ≈ J(h)ᵀ e_T, the shape of every true gradient), which an
additive code alone learns only slowly. The trunk is shared by all layers: one estimator serves
L+1 states, and all layers go through it as one concatenated batch. Rule-specific heads map the
(width)-dim features to a state, a scalar or a credit.

Estimators are float32 and built on the CPU from the global RNG in ``setup`` (reproducible from
the run seed), then moved to ``ctx.device``; their states are cast to float32 on the way in and
credits are returned in the dtype of the states.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from creditaudit.errors import ConfigError
from creditaudit.models.base import CreditNet
from creditaudit.rules.base import Rule, RuleContext

CODES = ("error", "label")


@dataclass
class EstimatorOptions:
    """Options every learned estimator has."""

    est_lr: float = field(default=1e-3, metadata={"help": "learning rate of the estimator's own AdamW (weight decay 0.01, constant schedule)"})
    width: int = field(default=128, metadata={"help": "estimator width: per-layer input adapters Linear(D_l, width) feed a shared trunk of this width"})
    depth: int = field(default=1, metadata={"help": "hidden Linear(width, width) layers of the shared trunk (GELU between)"})
    code: str = field(default="error", metadata={"help": "terminal conditioning code s: error (e_T = softmax(o) - onehot(y)) | label (onehot(y))"})


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


def check_choice(rule: str, option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{rule}.{option}={value!r}: expected one of {', '.join(choices)}")


def check_positive(rule: str, option: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ConfigError(f"{rule}.{option}={value!r}: must be a finite number > 0")


def per_sample_cosine(a: Tensor, b: Tensor) -> Tensor:
    """cos(a_i, b_i) over flattened features without an eps clamp in the numerator's scale (the
    norms are floored only at the dtype's smallest normal number, to avoid 0/0)."""
    a, b = a.flatten(1), b.flatten(1)
    tiny = torch.finfo(a.dtype).tiny
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(tiny)


# ---------------------------------------------------------------------------------------------
# Running the model from a state
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def frozen_norm_stats(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers in training mode keep using batch statistics but do not update their
    running statistics (nor ``num_batches_tracked``): probing the model must not change it."""
    switched = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.training and m.track_running_stats]
    for m in switched:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in switched:
            m.track_running_stats = True


def forward_from(model: CreditNet, l: int, h: Tensor) -> Tensor:
    """Logits of the rest of ``model`` run from state h_l: blocks l+1..L, terminal norm, head.

    ``h`` has the shape of h_l with any number of rows (e.g. several perturbed copies of a batch
    stacked along dim 0). The model's mode is kept (BatchNorm in training mode normalises with the
    statistics of the rows given) and no running statistic is updated. Gradients flow as usual;
    wrap in ``torch.no_grad()`` to probe.
    """
    with frozen_norm_stats(model):
        for block in model.blocks[l:]:
            h, _ = block(h)
        return model.readout(h)


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
    """Per-layer input adapters, τ(l), the code s (additive + gate) and a shared MLP trunk."""

    def __init__(self, state_dims: list[int], code_dim: int, width: int, depth: int):
        super().__init__()
        self.adapters = nn.ModuleList(nn.Linear(D, width) for D in state_dims)
        self.tau = nn.Embedding(len(state_dims), width)  # τ(l), l = 0..L
        nn.init.normal_(self.tau.weight, std=0.02)
        self.code_in = nn.Linear(code_dim, width, bias=False)
        self.code_gate = nn.Linear(code_dim, width, bias=False)
        layers: list[nn.Module] = [nn.GELU()]
        for _ in range(depth):
            layers += [nn.Linear(width, width), nn.GELU()]
        self.trunk = nn.Sequential(*layers)

    def features(self, states: list[Tensor], layers: list[int], code: Tensor) -> list[Tensor]:
        """Features (N_i, width) of each state ``states[i]`` (N_i, ...) of block index
        ``layers[i]``; ``code`` is (B, C) and N_i a multiple k·B of B (k stacked copies of the
        batch, the code repeated). All states pass the trunk as one batch."""
        B = code.shape[0]
        s_in, s_gate = self.code_in(code), 1.0 + self.code_gate(code)  # (B, width) each
        us, gates = [], []
        for h, l in zip(states, layers):
            k = h.shape[0] // B
            u = self.adapters[l](flat_ln(h.float())) + self.tau.weight[l] + s_in.repeat(k, 1)
            us.append(u)
            gates.append(s_gate.repeat(k, 1))
        z = self.trunk(torch.cat(us)) * torch.cat(gates)
        return list(z.split([u.shape[0] for u in us]))


# ---------------------------------------------------------------------------------------------
# EMA targets
# ---------------------------------------------------------------------------------------------
def ema_copy(module: nn.Module) -> nn.Module:
    """A frozen copy of ``module`` to be tracked by :func:`ema_update`."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, decay: float) -> None:
    """θ̄ ← decay·θ̄ + (1 − decay)·θ for every parameter (buffers copied)."""
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), 1.0 - decay)
    for tb, sb in zip(target.buffers(), source.buffers()):
        tb.copy_(sb)


# ---------------------------------------------------------------------------------------------
# The rule skeleton: lazy build, own optimizer and generator, checkpoint state
# ---------------------------------------------------------------------------------------------
class EstimatorRule(Rule):
    """A rule with a learned estimator. Subclasses implement :meth:`build` (the trainable modules
    for the given state shapes), ``credits`` and ``step``.

    The run context does not give the input shape, so the states' shapes are first known from a
    batch: ``setup`` draws one seed from torch's global CPU RNG (seeded from the run seed right
    before the model was built), and the estimator is built from that seed, on the CPU under a
    forked RNG, when the first batch arrives (:meth:`ready`). It is therefore a function of (run
    seed, model shapes) alone, whatever the device or the batch. The rule's own random stream
    (``self.gen``, on ``ctx.device``; noise and random directions) comes from the same seed.
    ``state_dict`` holds the shapes, the estimator, its optimizer, the generator and a step count.
    """

    Options = EstimatorOptions
    name: ClassVar[str] = "estimator"  # the registry name, for messages

    def setup(self, model: CreditNet, ctx: RuleContext) -> None:
        check_choice(self.name, "code", self.opts.code, CODES)
        check_positive(self.name, "est_lr", self.opts.est_lr)
        check_positive(self.name, "width", self.opts.width)
        self.ctx = ctx
        self.seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        self.gen = torch.Generator(device=ctx.device)
        self.gen.manual_seed(self.seed + 1)
        self.shapes: list[tuple[int, ...]] | None = None
        self.net: nn.Module | None = None
        self.opt: torch.optim.Optimizer | None = None
        self.steps = 0  # estimator steps taken

    def build(self, shapes: list[tuple[int, ...]]) -> nn.Module:
        """The trainable modules for per-sample state shapes h_0..h_L (drawn from the global RNG)."""
        raise NotImplementedError

    def after_build(self) -> None:
        """Hook: extra state made from the built estimator (EMA targets, fixed matrices)."""

    def ready(self, fwd_hs: list[Tensor]) -> None:
        """Build the estimator the first time the states' shapes are seen."""
        if self.net is None:
            self._build([tuple(h.shape[1:]) for h in fwd_hs])

    def _build(self, shapes: list[tuple[int, ...]]) -> None:
        if not hasattr(self, "ctx"):
            raise RuntimeError(f"{self.name}: call setup(model, ctx) before using the rule")
        self.shapes = [tuple(int(n) for n in s) for s in shapes]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            net = self.build(self.shapes)
            self.net = net.to(self.ctx.device)
            self.opt = torch.optim.AdamW(self.net.parameters(), lr=self.opts.est_lr, weight_decay=0.01)
            self.after_build()

    def train_on(self, loss: Tensor) -> None:
        """One optimizer step of the estimator on ``loss``."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.steps += 1

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"seed": self.seed, "steps": self.steps, "gen": self.gen.get_state()}
        if self.net is not None:
            state.update(shapes=[list(s) for s in self.shapes], net=self.net.state_dict(),
                         opt=self.opt.state_dict(), **self.extra_state())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed, self.steps = int(state["seed"]), int(state["steps"])
        self.gen.set_state(state["gen"].to("cpu", torch.uint8))
        if "shapes" in state:
            self._build([tuple(s) for s in state["shapes"]])
            self.net.load_state_dict(state["net"])
            self.opt.load_state_dict(state["opt"])
            self.load_extra_state(state)


def normalised_sq_error(p: Tensor, t: Tensor) -> Tensor:
    """mean_i ‖p_i − t_i‖² / (‖t_i‖² + 1e-3·mean_k ‖t_k‖² + tiny) for (B, K) predictions and
    targets: scale-free per sample, with a floor relative to the batch so that a sample whose
    target is ~0 does not dominate."""
    tt = t.pow(2).sum(1)
    denom = tt + 1e-3 * tt.mean() + torch.finfo(t.dtype).tiny
    return ((p - t).pow(2).sum(1) / denom).mean()
