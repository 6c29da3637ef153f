"""``fa_layerwise`` — textbook Feedback Alignment (Lillicrap et al. 2016): a fixed random matrix in place
of every weight transpose inside the blocks and of the head's transpose; everything else (the
identity path of residual blocks, norms, activations, BatchNorm, attention's softmax) is
backpropagated exactly.

Backward of each patched layer y = W x + b (``nn.Linear``, or ``nn.Conv2d`` read as a linear map):
         dL/dx = Bᵀ dL/dy     B fixed random, W's shape, in place of W
         dL/dW, dL/db         exact (the layer's own local gradients)
Credit:  a_l = "d(Σ_i CE_i)/d h_l" under this backward (per sample, not divided by B): a forward
         pass from sg(h_0) through the blocks and the readout, and one backward pass. The
         embedding's own layers need no feedback matrix — a_0 is the credit arriving at h_0.
Update:  the shared local update (DESIGN §1), with the blocks' layers patched during the trainer's
         local forward/backward (``local_forward``): each block's parameters are updated from a_l
         through the block's own feedback matrices, as textbook FA does; the embedding from a_0.
         The head is patched in the credit pass only (B_H carries e_T into h_L), not in the local
         pass, so terminal norm and head keep their exact CE gradient as DESIGN §1 requires
         (patching it there would send B_H's signal into the terminal norm's parameters).
Matrices: one B per ``nn.Linear``/``nn.Conv2d`` of the blocks and the head, drawn in ``setup`` from
         torch's global CPU RNG (seeded from the run seed right before the model) in the model's
         module order. ``init=uniform, scale=1``: U(±scale/√fan_in), fan_in = W[0].numel() — the
         distribution of PyTorch's default init of the layer it shadows; ``init=normal``: the same
         variance; ``init=weights``: a copy of the layer's initial W (then fixed; BP at step 0).
         :meth:`FALayerwise.align_to_weights` sets B = W for the current weights (B = W makes this
         rule exactly BP — ``tests/test_rules_feedback.py`` pins it).
Other layer types with weight matrices (Conv1d, MultiheadAttention, …) inside a block are refused at
``setup`` rather than silently backpropagated exactly.
Defaults: init=uniform, scale=1.0.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from creditaudit.models.base import CreditNet, Forward
from creditaudit.rules._feedback import check_choice, check_positive, preserved_buffers, random_matrix
from creditaudit.rules.base import RULES, Rule, RuleContext

LAYERWISE_INITS = ("uniform", "normal", "weights")


@dataclass
class FALayerwiseOptions:
    """Distribution of the feedback matrices that replace each weight transpose."""

    init: str = field(default="uniform", metadata={"help": "feedback matrices B: uniform U(±scale/√fan_in) (PyTorch's default layer init) | normal (same variance) | weights (a copy of the initial W, then fixed)"})
    scale: float = field(default=1.0, metadata={"help": "multiplies the bound/std of B (uniform, normal); 1 = the spread of PyTorch's default init of the layer"})

    def __post_init__(self) -> None:
        check_choice("fa_layerwise", "init", self.init, LAYERWISE_INITS)
        check_positive("fa_layerwise", "scale", self.scale)


# ---------------------------------------------------------------------------------------------
# Layers whose input gradient uses B instead of W
# ---------------------------------------------------------------------------------------------
class FALinearFn(torch.autograd.Function):
    """y = x Wᵀ + b; backward: dx = dy B, dW = dyᵀ x, db = Σ dy (x: (..., in), B: W's shape)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, feedback: Tensor) -> Tensor:
        ctx.save_for_backward(x, feedback)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, B = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = dy @ B.to(dy.dtype)
        dy2 = dy.reshape(-1, dy.shape[-1])  # (N, out)
        if ctx.needs_input_grad[1]:
            dw = dy2.T @ x.reshape(-1, x.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db, None


class FAConv2dFn(torch.autograd.Function):
    """y = conv2d(x, W, b); backward: dx = conv2d's input gradient with B in place of W, dW and db exact."""

    @staticmethod
    def forward(ctx, x, weight, bias, feedback, stride, padding, dilation, groups):
        ctx.save_for_backward(x, feedback)
        ctx.conf = (stride, padding, dilation, groups)
        ctx.weight_shape = weight.shape
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, B = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.nn.grad.conv2d_input(x.shape, B.to(dy.dtype), dy, stride, padding, dilation, groups)
        if ctx.needs_input_grad[1]:
            dw = torch.nn.grad.conv2d_weight(x, ctx.weight_shape, dy, stride, padding, dilation, groups)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum((0, 2, 3))
        return dx, dw, db, None, None, None, None, None


def _conv_padding(m: nn.Conv2d) -> tuple[int, int]:
    """The (symmetric) zero padding of ``m`` as numbers (``padding='same'``/``'valid'`` resolved)."""
    if m.padding == "valid":
        return (0, 0)
    if m.padding == "same":
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
        if any(t % 2 for t in total):
            raise NotImplementedError(f"fa_layerwise: padding='same' with an even kernel ({m}) is asymmetric; use explicit padding")
        return (total[0] // 2, total[1] // 2)
    return m.padding  # type: ignore[return-value]


def fa_forward(m: nn.Module, x: Tensor, B: Tensor, detach_weights: bool) -> Tensor:
    """``m``'s forward with B in the backward pass to its input (``detach_weights``: no graph to
    m's parameters, for a pass that only wants credits)."""
    w, b = m.weight, m.bias
    if detach_weights:
        w, b = w.detach(), (b.detach() if b is not None else None)
    if isinstance(m, nn.Linear):
        return FALinearFn.apply(x, w, b, B)
    assert isinstance(m, nn.Conv2d)
    padding = _conv_padding(m)
    if m.padding_mode != "zeros":  # pad outside the Function, exactly as nn.Conv2d does
        x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
        padding = (0, 0)
    return FAConv2dFn.apply(x, w, b, B, m.stride, padding, m.dilation, m.groups)


def feedback_layers(model: CreditNet) -> list[tuple[str, nn.Module]]:
    """(name, module) of every layer whose transpose gets a feedback matrix: the ``nn.Linear`` and
    ``nn.Conv2d`` layers of the blocks, and the head. Refuses other weight-matrix layers in blocks."""
    out = []
    for name, m in model.named_modules():
        in_blocks = name.startswith("blocks.")
        if name == "head" or (in_blocks and isinstance(m, (nn.Linear, nn.Conv2d))):
            if not isinstance(m, (nn.Linear, nn.Conv2d)):
                raise NotImplementedError(f"fa_layerwise: the head is a {type(m).__name__}, not nn.Linear")
            out.append((name, m))
        elif in_blocks and any(p.dim() >= 2 for p in m.parameters(recurse=False)):
            raise NotImplementedError(
                f"fa_layerwise replaces the weight transposes of nn.Linear and nn.Conv2d only; {name} is a "
                f"{type(m).__name__} whose matrices would be backpropagated exactly"
            )
    return out


# ---------------------------------------------------------------------------------------------
# The rule
# ---------------------------------------------------------------------------------------------
@RULES.register("fa_layerwise", "textbook feedback alignment: fixed random B in place of every weight transpose (blocks, head)")
class FALayerwise(Rule):
    Options = FALayerwiseOptions

    def __init__(self, options: FALayerwiseOptions | None = None):
        super().__init__(options)
        self.feedback: dict[str, Tensor] = {}  # layer name -> B (W's shape), float32, on the run's device
        self._patched_ids: set[int] = set()  # id() of the layers patched right now
        self._credit_pass = False
        self.device = torch.device("cpu")

    def setup(self, model: CreditNet, ctx: RuleContext) -> None:
        self.device = ctx.device
        self.feedback = {}
        for name, m in feedback_layers(model):
            W = m.weight.detach()
            if self.opts.init == "weights":
                B = W.clone()
            else:
                fan_in = W[0].numel()
                # uniform: U(±scale/√fan_in), PyTorch's default init; normal: the same variance
                B = random_matrix(tuple(W.shape), 3 * fan_in, self.opts.init, self.opts.scale)
            self.feedback[name] = B.to(ctx.device, torch.float32)

    @torch.no_grad()
    def align_to_weights(self, model: CreditNet) -> None:
        """B = W for every patched layer (the current weights, copied; in W's dtype): BP exactly."""
        for name, m in feedback_layers(model):
            self.feedback[name] = m.weight.detach().clone()

    # -------------------------------------------------------------------------------------------
    # the patched model
    # -------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _patched(self, model: CreditNet, with_head: bool) -> Iterator[None]:
        """Route the forward of the blocks' layers (and the head's, ``with_head``) through
        :func:`fa_forward`. Re-entrant: a layer that is already patched is left to its owner."""
        layers = [(n, m) for n, m in feedback_layers(model) if (with_head or n != "head") and id(m) not in self._patched_ids]
        missing = [name for name, _ in layers if name not in self.feedback]
        if missing:
            raise RuntimeError(f"fa_layerwise has no feedback matrix for {missing}: call setup(model, ctx) with this model")
        try:
            for name, m in layers:
                # an instance attribute shadows the class's forward; removing it restores the layer
                m.forward = (lambda x, m=m, name=name: fa_forward(m, x, self.feedback[name], self._credit_pass))
                self._patched_ids.add(id(m))
            yield
        finally:
            for _, m in layers:
                m.__dict__.pop("forward", None)
                self._patched_ids.discard(id(m))

    def local_forward(self, model: CreditNet) -> contextlib.AbstractContextManager:
        """The trainer's local pass: the blocks' layers backpropagate through their feedback
        matrices. The head is not patched here, so terminal norm and head keep their exact CE
        gradient (DESIGN §1); its B_H acts in the credit pass only."""
        return self._patched(model, with_head=False)

    def credits(self, model: CreditNet, x: Tensor, y: Tensor, fwd: Forward) -> list[Tensor]:
        was_credit_pass, self._credit_pass = self._credit_pass, True
        try:
            with self._patched(model, with_head=True), preserved_buffers(model), torch.enable_grad():
                h = fwd.hs[0].detach().requires_grad_(True)
                hs = [h]
                for block in model.blocks:
                    h, _ = block(h)
                    hs.append(h)
                loss = F.cross_entropy(model.readout(h), y, reduction="sum")
                grads = torch.autograd.grad(loss, hs)
        finally:
            self._credit_pass = was_credit_pass
        return [g.detach() for g in grads]

    # -------------------------------------------------------------------------------------------
    # checkpoints
    # -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"feedback": dict(self.feedback)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        given = state["feedback"]
        if set(given) != set(self.feedback) and self.feedback:
            raise ValueError(f"fa_layerwise checkpoint has feedback for {sorted(given)}, the model needs {sorted(self.feedback)}")
        self.feedback = {k: v.to(self.device) for k, v in given.items()}
