"""``kp`` — Kolen–Pollack (Kolen & Pollack 1994; Akrout et al. 2019): layerwise feedback matrices B in
place of every weight transpose inside the blocks and of the head's, which receive their layer's
weight update and the same weight decay, so that B → W over training.

Backward of each patched layer y = W x + b (``nn.Linear``, or a convolution read as a linear map):
         dL/dx = Bᵀ dL/dy     B learned, W's shape, in place of W
         dL/dW, dL/db         exact (the layer's own local gradients)
Credit:  a_l = "d(Σ_i CE_i)/d h_l" under this backward (per sample, not divided by B): a forward
         pass from sg(h_0) through the blocks and the readout, and one backward pass (the
         skeleton of ``fa_layerwise``, ``rules/_layerwise.py``). a_0 trains the embedding.
Update:  the shared local update (docs/science.md §1) for the model, with the blocks' layers patched during
         the trainer's local forward/backward; the head is patched in the credit pass only
         (terminal norm and head keep their exact CE gradient). Then B follows W. Akrout et al.:
             ΔW = −η·(δ xᵀ) − λW,   ΔB = −η·(δ xᵀ) − λB
         — the same gradient-driven step and the same decay, *each on its own matrix* — so
         W − B shrinks by (1 − λ) per step and B → W. With AdamW, whose step is
         W' = (1 − lr·wd)·W − lr·u (u from the gradient alone), that is
             B' = (1 − lr·wd)·B − lr·u = W' + (1 − lr·wd)·(B − W).
         ``step()`` applies this after the optimizer step, with W and lr·wd recorded at that
         optimizer step by torch's global pre-step hook, armed by ``local_forward`` for the next
         step of an optimizer that holds these weights (only weights with a gradient count).
         Why not B ← B + (W' − W): W' − W contains W's decay −lr·wd·W, not −lr·wd·B, so B − W
         would stay equal to B_0 − W_0 forever (B never converges to W). A layer the optimizer
         does not step (a ``_frozen`` block) keeps its B. Exact for AdamW and for SGD without
         momentum (decay 1 − lr·wd); an optimizer that folds a nonzero weight decay into its
         gradient statistics (Adam's L2, SGD with momentum) is refused at its step, in one line.
         With B_0 = W_0 (``init=weights``) B' = W' bit for bit: kp is BP at every step.
         Logged: ``rule/align_cos``, the mean over patched layers of cos∠(B, W) after the step.
Matrices: B_0 per patched layer like ``fa_layerwise``'s: ``init=uniform`` U(±scale/√fan_in) (PyTorch's
         default init of the layer), ``init=normal`` the same variance, ``init=weights`` a copy of the
         initial W; in W's dtype, drawn in ``setup``, in module order, on the CPU from a generator
         seeded from the run's seeded global RNG (``rules/_feedback.py``): a function of (run seed,
         model) alone, identical on every device. B is checkpointed.
Defaults: init=uniform, scale=1.0 (B_0 random and independent of W_0, as in Akrout et al.).
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

from creditaudit.models.base import CreditNet, Forward
from creditaudit.rules._feedback import feedback_generator
from creditaudit.rules._layerwise import (
    FEEDBACK_INITS,
    LayerwiseFeedbackRule,
    WeightLayer,
    alignment,
    initial_feedback,
)
from creditaudit.rules.base import RULES, RuleContext
from creditaudit.rules.options import check_choice, check_positive


@dataclass
class KPOptions:
    """Initial feedback matrices B_0 of Kolen–Pollack (B then receives W's updates and decay)."""

    init: str = field(
        default="uniform",
        metadata={
            "help": (
                "B_0: uniform U(±scale/√fan_in) (PyTorch's default layer init) | normal (same "
                "variance) | weights (a copy of W_0: BP at every step)"
            )
        },
    )
    scale: float = field(
        default=1.0,
        metadata={
            "help": (
                "multiplies the bound/std of B_0 (uniform, normal); 1 = the spread of PyTorch's "
                "default init of the layer"
            )
        },
    )

    def __post_init__(self) -> None:
        check_choice("init", self.init, FEEDBACK_INITS)
        check_positive("scale", self.scale)


def decay_factor(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> float:
    """c in W' = c·W − (a step computed from the gradient alone), for ``group`` of ``optimizer``."""
    wd = float(group.get("weight_decay", 0.0) or 0.0)
    if wd == 0.0:
        return 1.0
    lr = float(group["lr"])
    decoupled = isinstance(optimizer, torch.optim.AdamW) or bool(
        group.get("decoupled_weight_decay", False)
    )
    plain_sgd = type(optimizer) is torch.optim.SGD and not group.get("momentum", 0.0)
    if decoupled or plain_sgd:
        return 1.0 - lr * wd
    raise NotImplementedError(
        f"kp: {type(optimizer).__name__} folds weight_decay={wd} into its gradient statistics, so B cannot get "
        "W's update and decay; use AdamW (decoupled decay), SGD without momentum, or weight_decay=0"
    )


# One process-wide pre-step hook, registered on first use and never removed (removing a hook from
# inside the hook loop would change the dict torch is iterating); it serves the armed KP rules.
_ARMED: weakref.WeakSet[KP] = weakref.WeakSet()
_HOOK: Any = None


def _pre_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for rule in list(_ARMED):
        rule._before_optimizer_step(optimizer)


@RULES.register(
    "kp",
    "Kolen-Pollack: learned B in place of every weight transpose, given W's update and decay (B -> W)",
)
class KP(LayerwiseFeedbackRule[KPOptions]):
    Options = KPOptions
    stack_refusal = "its feedback matrices change in every step (optimizer hooks), and it patches the model's layers"

    def __init__(self, options: KPOptions | None = None):
        super().__init__(options)
        self.seed: int | None = None
        self.feedback: dict[
            str, Tensor
        ] = {}  # layer name -> B (W's shape and dtype), on the run's device
        self._layers: list[tuple[str, WeightLayer]] = []  # the layers of the model last patched
        self._pending: dict[
            str, tuple[WeightLayer, Tensor, float]
        ] = {}  # name -> (layer, W before the step, c)

    def setup(self, model: CreditNet, ctx: RuleContext) -> None:
        self.device = ctx.device
        self.seed, g = feedback_generator()
        self.feedback = {}
        for name, m in self.layers(model):
            self.feedback[name] = initial_feedback(
                m.weight, self.opts.init, self.opts.scale, ctx.device, m.weight.dtype, g
            )

    def feedback_for(self, name: str, m: WeightLayer) -> Tensor:
        return self.feedback[name]

    # -------------------------------------------------------------------------------------------
    # B follows W
    # -------------------------------------------------------------------------------------------
    def local_forward(self, model: CreditNet) -> contextlib.AbstractContextManager:
        """The patched local pass (as ``fa_layerwise``), and the pre-step hook armed for the
        optimizer step that follows it."""
        self._arm(model)
        return super().local_forward(model)

    def _arm(self, model: CreditNet) -> None:
        global _HOOK
        if _HOOK is None:
            _HOOK = register_optimizer_step_pre_hook(_pre_step)
        self._layers = self.layers(model)
        self._pending = {}  # an optimizer step that no step() followed is not B's business
        _ARMED.add(self)

    @torch.no_grad()
    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        stepped = [
            (n, m)
            for n, m in self._layers
            if id(m.weight) in group_of and m.weight.grad is not None
        ]
        if not stepped:  # another optimizer (an estimator's, another run's): stay armed
            return
        self._pending = {
            n: (m, m.weight.detach().clone(), decay_factor(optimizer, group_of[id(m.weight)]))
            for n, m in stepped
        }
        _ARMED.discard(self)

    @torch.no_grad()
    def step(self, model: CreditNet, x: Tensor, y: Tensor, fwd: Forward) -> dict[str, Tensor]:
        """B' = W' + c·(B − W) for every layer the optimizer just stepped (c = 1 − lr·wd)."""
        for name, (m, W_old, c) in self._pending.items():
            W_new = m.weight.detach()
            # .contiguous(): B keeps the standard layout initial_feedback gave it (W may be channels-last)
            self.feedback[name] = (W_new + c * (self.feedback[name] - W_old)).contiguous()
        self._pending = {}
        layers = self._layers or self.layers(model)
        cos = torch.stack([alignment(self.feedback[n], m.weight) for n, m in layers])
        return {"align_cos": cos.mean()}

    # -------------------------------------------------------------------------------------------
    # checkpoints
    # -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "feedback": dict(self.feedback)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        given = state["feedback"]
        if self.feedback and set(given) != set(self.feedback):
            raise ValueError(
                f"kp checkpoint has feedback for {sorted(given)}, the model needs {sorted(self.feedback)}"
            )
        self.seed = state["seed"]
        self.feedback = {k: v.to(self.device) for k, v in given.items()}
