"""Pieces shared by the layerwise feedback rules (``fa_layerwise``, ``usf``, ``frsf``, ``brsf``, ``kp``):
a matrix B (W's shape) in place of every weight transpose inside the blocks and of the head's.

* :class:`FALinearFn`, :class:`FAConvFn`, :func:`fa_forward`: an ``nn.Linear`` / ``nn.Conv1d`` /
  ``nn.Conv2d`` forward whose backward sends ``Bᵀ dL/dy`` (conv: the input gradient of the same convolution with B
  as its weight) to the input, while dL/dW and dL/db stay exact;
* :func:`feedback_layers`: the layers that get a B — the blocks' ``nn.Linear``/``nn.Conv{1,2}d`` and
  the head — and a one-line refusal of any other weight-matrix layer inside a block (it would be
  backpropagated exactly, silently);
* :class:`LayerwiseFeedbackRule`: the rule skeleton. A subclass says which B a layer uses *now*
  (:meth:`~LayerwiseFeedbackRule.feedback_for`); the skeleton patches the blocks' layers during the
  trainer's local forward/backward (``local_forward``) and computes the credits with one patched
  forward from sg(h_0) through the blocks and the readout and one backward pass. The head is
  patched in the credit pass only, so terminal norm and head keep their exact CE gradient
  (docs/science.md §1);
* :class:`SignConcordantRule`: B = M ∘ sign(W) for the sign-symmetry family (``usf``, ``frsf``,
  ``brsf``), with sign(W) read from the layer's *current* weights whenever the layers are patched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.grad  # the convolutions' input and weight gradients (torch.nn does not re-export it)
from torch import Tensor, nn
from torch.nn import functional as F

from creditaudit.models.base import CreditNet, Forward
from creditaudit.rules._feedback import INITS, preserved_buffers, random_matrix
from creditaudit.rules.base import OptionsT, Rule, RuleContext
from creditaudit.rules.options import check_choice, check_positive


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


_CONV = {
    1: (F.conv1d, torch.nn.grad.conv1d_input, torch.nn.grad.conv1d_weight),
    2: (F.conv2d, torch.nn.grad.conv2d_input, torch.nn.grad.conv2d_weight),
}
CONV_LAYERS = (nn.Conv1d, nn.Conv2d)
#: the layers whose weight transpose gets a feedback matrix
WeightLayer = nn.Linear | nn.Conv1d | nn.Conv2d


class FAConvFn(torch.autograd.Function):
    """y = conv(x, W, b) over one or two spatial axes; backward: dx = the convolution's input gradient
    with B in place of W, dW and db exact."""

    @staticmethod
    def forward(ctx, x, weight, bias, feedback, stride, padding, dilation, groups):
        ctx.save_for_backward(x, feedback)
        ctx.conf = (stride, padding, dilation, groups)
        ctx.weight_shape = weight.shape
        ctx.has_bias = bias is not None
        return _CONV[weight.dim() - 2][0](x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, B = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        _, conv_input, conv_weight = _CONV[len(ctx.weight_shape) - 2]
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = conv_input(x.shape, B.to(dy.dtype), dy, stride, padding, dilation, groups)
        if ctx.needs_input_grad[1]:
            dw = conv_weight(x, ctx.weight_shape, dy, stride, padding, dilation, groups)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum((0, *range(2, dy.dim())))
        return dx, dw, db, None, None, None, None, None


def _conv_padding(m: nn.Conv1d | nn.Conv2d) -> tuple[int, ...]:
    """The (symmetric) zero padding of ``m`` as numbers (``padding='same'``/``'valid'`` resolved)."""
    if m.padding == "valid":
        return (0,) * len(m.kernel_size)
    if m.padding == "same":
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size, strict=True)]
        if any(t % 2 for t in total):
            raise NotImplementedError(
                f"layerwise feedback: padding='same' with an even kernel ({m}) is asymmetric; use explicit padding"
            )
        return tuple(t // 2 for t in total)
    return m.padding  # type: ignore[return-value]


def fa_forward(m: WeightLayer, x: Tensor, B: Tensor, detach_weights: bool) -> Tensor:
    """``m``'s forward with B in the backward pass to its input (``detach_weights``: no graph to
    m's parameters, for a pass that only wants credits)."""
    w, b = m.weight, m.bias
    if detach_weights:
        w, b = w.detach(), (b.detach() if b is not None else None)
    if isinstance(m, nn.Linear):
        return FALinearFn.apply(x, w, b, B)
    assert isinstance(m, CONV_LAYERS)
    padding = _conv_padding(m)
    if m.padding_mode != "zeros":  # pad outside the Function, exactly as the layer does
        x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
        padding = (0,) * len(m.kernel_size)
    return FAConvFn.apply(x, w, b, B, m.stride, padding, m.dilation, m.groups)


def feedback_layers(model: CreditNet, rule: str = "fa_layerwise") -> list[tuple[str, WeightLayer]]:
    """(name, module) of every layer whose transpose gets a feedback matrix: the ``nn.Linear`` and
    ``nn.Conv1d``/``nn.Conv2d`` layers of the blocks, and the head, in module order. Refuses other
    weight-matrix layers in blocks (``rule`` names the rule in the message)."""
    out: list[tuple[str, WeightLayer]] = []
    for name, m in model.named_modules():
        in_blocks = name.startswith("blocks.")
        if name == "head" or (in_blocks and isinstance(m, (nn.Linear, *CONV_LAYERS))):
            if not isinstance(m, (nn.Linear, *CONV_LAYERS)):
                raise NotImplementedError(
                    f"{rule}: the head is a {type(m).__name__}, not nn.Linear"
                )
            out.append((name, m))
        elif in_blocks and any(p.dim() >= 2 for p in m.parameters(recurse=False)):
            raise NotImplementedError(
                f"{rule} replaces the weight transposes of nn.Linear, nn.Conv1d and nn.Conv2d only; {name} is a "
                f"{type(m).__name__} whose matrices would be backpropagated exactly"
            )
    return out


def alignment(B: Tensor, W: Tensor) -> Tensor:
    """cos∠(B, W) of two matrices read as vectors (float64, no eps clamp; 0-d tensor)."""
    b, w = B.detach().double().flatten(), W.detach().double().flatten()
    return (b @ w) / (b.norm() * w.norm())


# ---------------------------------------------------------------------------------------------
# The rule skeleton
# ---------------------------------------------------------------------------------------------
class LayerwiseFeedbackRule(Rule[OptionsT]):
    """A rule whose credits and block updates backpropagate through B in place of every Wᵀ.

    Subclasses implement :meth:`setup` (their per-layer state), :meth:`feedback_for` and the
    checkpoint methods; ``name`` is the registered name, used in error messages."""

    stack_refusal = "patches the model's layers with custom autograd functions, which have no run-axis (vmap) rule yet"

    def __init__(self, options: OptionsT | None = None):
        super().__init__(options)
        self._patched_ids: set[int] = set()  # id() of the layers patched right now
        self._credit_pass = False
        self.device = torch.device("cpu")

    def feedback_for(self, name: str, m: WeightLayer) -> Tensor:
        """The B (W's shape) that layer ``name`` uses in place of its transpose in this pass;
        ``KeyError`` when the rule holds no state for that layer."""
        raise NotImplementedError

    def layers(self, model: CreditNet) -> list[tuple[str, WeightLayer]]:
        return feedback_layers(model, self.name)

    @contextlib.contextmanager
    def _patched(self, model: CreditNet, with_head: bool) -> Iterator[None]:
        """Route the forward of the blocks' layers (and the head's, ``with_head``) through
        :func:`fa_forward` with the B of :meth:`feedback_for`, read once on entry. Re-entrant: a
        layer that is already patched is left to its owner."""
        layers = [
            (n, m)
            for n, m in self.layers(model)
            if (with_head or n != "head") and id(m) not in self._patched_ids
        ]
        feedback, missing = {}, []
        for name, m in layers:
            try:
                feedback[name] = self.feedback_for(name, m)
            except KeyError:
                missing.append(name)
        if missing:
            raise RuntimeError(
                f"{self.name} has no feedback matrix for {missing}: call setup(model, ctx) with this model"
            )
        try:
            for name, m in layers:
                # an instance attribute shadows the class's forward; removing it restores the layer
                m.forward = lambda x, m=m, B=feedback[name]: fa_forward(m, x, B, self._credit_pass)  # type: ignore[method-assign,misc]  # a patch, on purpose
                self._patched_ids.add(id(m))
            yield
        finally:
            for _, m in layers:
                m.__dict__.pop("forward", None)
                self._patched_ids.discard(id(m))

    def local_forward(self, model: CreditNet) -> contextlib.AbstractContextManager:
        """The trainer's local pass: the blocks' layers backpropagate through their feedback
        matrices. The head is not patched here, so terminal norm and head keep their exact CE
        gradient (docs/science.md §1); its B_H acts in the credit pass only."""
        return self._patched(model, with_head=False)

    def credits(self, model: CreditNet, x: Tensor, y: Tensor, fwd: Forward) -> list[Tensor]:
        was_credit_pass, self._credit_pass = self._credit_pass, True
        try:
            with (
                self._patched(model, with_head=True),
                preserved_buffers(model),
                torch.enable_grad(),
            ):
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


# ---------------------------------------------------------------------------------------------
# Sign-concordant feedback: B = M ∘ sign(W)
# ---------------------------------------------------------------------------------------------
FEEDBACK_INITS = ("uniform", "normal", "weights")  # the initial B of fa_layerwise and kp


def initial_feedback(
    W: Tensor,
    init: str,
    scale: float,
    device: torch.device,
    dtype: torch.dtype,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A feedback matrix B for a layer with weights W (``init`` one of FEEDBACK_INITS): a copy of W
    (``weights``), or i.i.d. entries with the variance of PyTorch's default init of the layer times
    scale² (``uniform``: U(±scale/√fan_in); ``normal``: the same variance), drawn on the CPU from
    ``generator`` (None: torch's global RNG). Returned on ``device`` in ``dtype`` and in the standard
    layout whatever W's (SmallCNN keeps its weights channels-last): a B restored from a checkpoint
    has that layout too, so a resumed run computes bit for bit."""
    if init == "weights":
        B = W.detach().clone()
    else:
        B = random_matrix(tuple(W.shape), 3 * W[0].numel(), init, scale, generator)
    return B.to(device, dtype, memory_format=torch.contiguous_format)


class SignConcordantRule(LayerwiseFeedbackRule[OptionsT]):
    """B = M ∘ sign(W), sign(W) from the layer's current weights each time the layers are patched
    (so sign(B) = sign(W) at every step), M a per-layer magnitude: a number (``usf``) or a
    nonnegative matrix (``frsf``, ``brsf``). ``init_std[name]`` is s, the std of the layer's initial
    weights (read in ``setup``), the scale of M."""

    def __init__(self, options: OptionsT | None = None):
        super().__init__(options)
        self.init_std: dict[str, float] = {}  # layer name -> s = std of W at init
        self.weight_shapes: dict[str, tuple[int, ...]] = {}
        self.magnitude: dict[
            str, Tensor
        ] = {}  # layer name -> M (W's shape, float32; or 0-d, float64), on the device

    def setup(self, model: CreditNet, ctx: RuleContext) -> None:
        self.device = ctx.device
        layers = self.layers(model)
        self.init_std = {name: float(m.weight.detach().double().std()) for name, m in layers}
        self.weight_shapes = {name: tuple(m.weight.shape) for name, m in layers}
        self.magnitude = {}

    def feedback_for(self, name: str, m: WeightLayer) -> Tensor:
        W = m.weight.detach()
        return self.magnitude[name].to(W.dtype) * torch.sign(W)

    def random_magnitudes(
        self, generator: torch.Generator, init: str, scale: float
    ) -> dict[str, Tensor]:
        """|R| per layer, R i.i.d. with variance (scale·s)² (``normal`` or ``uniform``, see
        ``_feedback.random_matrix``), drawn on the CPU from ``generator`` in module order."""
        return {
            name: random_matrix(shape, 1, init, scale * self.init_std[name], generator)
            .abs()
            .to(self.device)
            for name, shape in self.weight_shapes.items()
        }


@dataclass
class RandomMagnitudeOptions:
    """Distribution of the random magnitudes |R| in B = |R| ∘ sign(W) (``frsf``: R drawn once;
    ``brsf``: redrawn after every update)."""

    init: str = field(
        default="normal",
        metadata={
            "help": (
                "entries of R: normal N(0, (scale·s)²) | uniform (same variance); s = std of the "
                "layer's initial weights"
            )
        },
    )
    scale: float = field(
        default=1.0,
        metadata={"help": "R has std scale·s (1: |B| has the spread of the layer's init)"},
    )

    def __post_init__(self) -> None:
        check_choice("init", self.init, INITS)
        check_positive("scale", self.scale)


class RandomMagnitudeRule(SignConcordantRule[OptionsT]):
    """B = |R| ∘ sign(W) with random magnitudes R (``frsf``, ``brsf``): the generator's seed, the
    layers' init stds and the current |R| are the checkpointed state (subclasses add theirs)."""

    def __init__(self, options: OptionsT | None = None):
        super().__init__(options)
        self.seed: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "init_std": dict(self.init_std),
            "magnitude": dict(self.magnitude),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.magnitude and set(state["magnitude"]) != set(self.magnitude):
            raise ValueError(
                f"{self.name} checkpoint has layers {sorted(state['magnitude'])}, the model "
                f"needs {sorted(self.magnitude)}"
            )
        self.seed = state["seed"]
        self.init_std = {k: float(v) for k, v in state["init_std"].items()}
        self.magnitude = {k: v.to(self.device) for k, v in state["magnitude"].items()}
