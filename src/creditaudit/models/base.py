"""The one model shape every architecture shares (docs/science.md §1), and the architecture registry.

    h_0 = E(x)                        embedding
    h_l = h_{l-1} + f_l(h_{l-1})      l = 1..L  (h_l = f_l(h_{l-1}) for non-residual blocks)
    z   = N(h_L)                      terminal norm (identity when there is none)
    o   = H(z)                        linear head, C classes

A :class:`CreditNet` exposes exactly these pieces (``embed``, ``blocks[l-1].branch``, ``norm``,
``head``) and a forward pass that returns every residual-stream state, so rules, the trainer and the
diagnostics never special-case an architecture.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from creditaudit import autodiff
from creditaudit.errors import ConfigError
from creditaudit.registry import Registry
from creditaudit.typedconfig import Config


@dataclass
class ModelConfig(Config):
    """Architecture hyper-parameters. ``None`` means "the architecture's own default"."""

    d: int | None = field(
        default=None,
        metadata={
            "help": (
                "width of the residual stream h_l (mlp: hidden width; smallcnn: FC width); "
                "default per arch: resmlp 256, vit_mini 128, mlp 256, smallcnn 256"
            )
        },
    )
    L: int | None = field(
        default=None,
        metadata={
            "help": (
                "number of blocks (mlp: hidden layers after the first); default per arch: resmlp "
                "4, vit_mini 4, mlp 3, smallcnn 3 (fixed); 0 gives the shallow variant"
            )
        },
    )
    out_ln: bool | None = field(
        default=None,
        metadata={
            "help": (
                "terminal LayerNorm N before the head; default per arch: on for resmlp, "
                "vit_mini; off for mlp, smallcnn"
            )
        },
    )
    residual: bool | None = field(
        default=None,
        metadata={
            "help": (
                "skip path h_l = h_{l-1} + f_l (false: h_l = f_l(h_{l-1})); default per arch: on "
                "for resmlp, vit_mini; off for mlp, smallcnn (whose stages change shape: no skip "
                "possible)"
            )
        },
    )
    w2_std: float = field(
        default=0.01,
        metadata={
            "help": "std of the normal init of each resmlp block's output matrix W2 (its bias is 0)"
        },
    )
    activation: str = field(
        default="relu", metadata={"help": "mlp activation: relu | gelu | tanh | sigmoid"}
    )
    heads: int = field(default=4, metadata={"help": "vit_mini attention heads"})
    patch: int = field(
        default=4, metadata={"help": "vit_mini patch size (must divide the image size)"}
    )
    channels: tuple[int, ...] = field(
        default=(32, 64, 128), metadata={"help": "smallcnn channels of its 3 conv layers"}
    )


@dataclass
class Forward:
    """Everything one forward pass produces. ``hs[l]`` is h_l with shape (B, ...), l = 0..L."""

    logits: Tensor  # (B, C)
    hs: list[Tensor]  # L+1 states
    fs: list[Tensor]  # L branch outputs f_l(h_{l-1}), l = 1..L (fs[l-1])


class Block(nn.Module):
    """One block: a residual branch ``f_l`` and whether the skip path is kept."""

    def __init__(self, branch: nn.Module, residual: bool = True):
        super().__init__()
        self.branch = branch
        self.residual = residual

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        f = self.branch(h)
        return (h + f if self.residual else f), f


class CreditNet(nn.Module):
    """Embedding, a stack of :class:`Block`, terminal norm and linear head."""

    def __init__(self, embed: nn.Module, blocks: list[Block], norm: nn.Module, head: nn.Linear):
        super().__init__()
        self.embed = embed
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm
        self.head = head

    @property
    def L(self) -> int:
        return len(self.blocks)

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def readout(self, h_L: Tensor) -> Tensor:
        """o = H(N(h_L))."""
        return self.head(self.norm(h_L))

    def run(self, x: Tensor, *, detach_inputs: bool = False) -> Forward:
        """Forward pass keeping every state.

        With ``detach_inputs`` each block sees ``sg(h_{l-1})`` and the readout sees ``sg(h_L)``, so
        the graph of ``hs[l]`` (l >= 1) reaches only block l's parameters and the graph of
        ``logits`` only the norm and head: this is the local-update forward pass of docs/science.md §1.
        """
        h = self.embed(x)
        hs, fs = [h], []
        for block in self.blocks:
            h, f = block(h.detach() if detach_inputs else h)
            hs.append(h)
            fs.append(f)
        logits = self.readout(h.detach() if detach_inputs else h)
        return Forward(logits, hs, fs)

    def forward_from(self, l: int, h: Tensor) -> Tensor:
        """Logits of blocks l+1..L, terminal norm and head, run from a state ``h`` with the shape of
        h_l and any number of rows (e.g. perturbed copies of a batch stacked along dim 0). The mode
        is kept (BatchNorm in training mode normalises with the rows given) and no buffer moves:
        a probe never changes the model. Gradients flow as usual."""
        with preserved_buffers(self):
            for block in self.blocks[l:]:
                h, _ = block(h)
            return self.readout(h)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h, _ = block(h)
        return self.readout(h)

    @torch.no_grad()
    def shapes(self, input_shape: tuple[int, ...]) -> tuple[list[tuple[int, ...]], tuple[int, ...]]:
        """Per-sample shapes of h_0..h_L and of z = N(h_L) for inputs of ``input_shape`` (one probe
        pass in eval mode on a zero input: no RNG drawn, no buffer moved)."""
        was_training = self.training
        self.eval()
        try:
            p = next(self.parameters())
            fwd = self.run(torch.zeros(1, *input_shape, device=p.device, dtype=p.dtype))
            z = self.norm(fwd.hs[-1])
        finally:
            self.train(was_training)
        return [tuple(h.shape[1:]) for h in fwd.hs], tuple(z.shape[1:])

    def readout_parameters(self) -> list[nn.Parameter]:
        return list(self.norm.parameters()) + list(self.head.parameters())

    def param_groups(self, *, blocks: bool = True, readout: bool = True) -> list[dict]:
        """One optimizer parameter group per trainable piece — embedding, each block, readout —
        so that an elementwise optimizer (AdamW, SGD) is exactly one optimizer per block."""
        groups = [{"params": list(self.embed.parameters()), "name": "embed"}]
        if blocks:
            groups += [
                {"params": list(b.parameters()), "name": f"block{l + 1}"}
                for l, b in enumerate(self.blocks)
            ]
        if readout:
            groups.append({"params": self.readout_parameters(), "name": "readout"})
        return [g for g in groups if g["params"]]


# An architecture builder: (config, input_shape, num_classes) -> CreditNet.
ArchBuilder = Callable[[ModelConfig, tuple, int], CreditNet]


@dataclass(frozen=True)
class ArchShape:
    """Width, depth, terminal norm and skip path of an architecture, every one resolved."""

    d: int
    L: int
    out_ln: bool
    residual: bool


@dataclass(frozen=True)
class ArchSpec:
    """A registered architecture: its builder and everything else about it lives with it."""

    build: ArchBuilder
    defaults: ArchShape  # what it takes where its config leaves d, L, out_ln or residual unset
    reads: tuple[str, ...] = ()  # the architecture-specific ModelConfig fields it reads
    small: dict = field(
        default_factory=dict
    )  # ModelConfig fields of a small instance (tests, smoke runs)


ARCHS: Registry[ArchSpec] = Registry("architecture")

# Model fields that only some architectures read (every one reads d, L, out_ln, residual). A config
# giving one of them a non-default value for an architecture that does not read it is refused at
# validation rather than silently ignored.
ARCH_SPECIFIC_FIELDS = ("w2_std", "activation", "heads", "patch", "channels")


def architecture(
    name: str,
    summary: str,
    *,
    d: int,
    L: int,
    out_ln: bool,
    residual: bool,
    reads: tuple[str, ...] = (),
    small: dict | None = None,
) -> Callable[[ArchBuilder], ArchBuilder]:
    """Register a builder as architecture ``name`` with its defaults: adding an architecture is one file.

        @architecture("resmlp", "pre-LN residual MLP", d=256, L=4, out_ln=True, residual=True,
                      reads=("w2_std",), small={"d": 16, "L": 2})
        def resmlp(cfg: ModelConfig, input_shape: tuple, num_classes: int) -> CreditNet: ...

    ``small`` is an instance of a few thousand parameters that trains in milliseconds on 1×8×8
    images: tests walk every registered architecture with it."""
    unknown = set(reads) - set(ARCH_SPECIFIC_FIELDS)
    if unknown:
        raise ValueError(f"architecture {name!r} reads unknown model fields {sorted(unknown)}")

    def deco(build: ArchBuilder) -> ArchBuilder:
        ARCHS.add(
            name,
            ArchSpec(build, ArchShape(d, L, out_ln, residual), tuple(reads), dict(small or {})),
            summary,
        )
        return build

    return deco


def arch_fields(arch: str) -> tuple[str, ...]:
    """The architecture-specific model fields ``arch``'s builder reads."""
    return ARCHS.get(arch).reads


def build_model(
    name: str, cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int
) -> CreditNet:
    """Build a registered architecture (parameters drawn from the current torch RNG)."""
    return ARCHS.get(name).build(cfg, tuple(input_shape), num_classes)


def parameter_count(
    name: str, cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int
) -> int | None:
    """How many parameters ``build_model`` would give, counted on the meta device: nothing is
    allocated and no random number drawn, whatever the sizes. None when the builder cannot run
    there (a plugin's builder reading values of its tensors)."""
    try:
        with torch.device("meta"):
            model = build_model(name, cfg, input_shape, num_classes)
    except (NotImplementedError, RuntimeError):
        return None
    return sum(p.numel() for p in model.parameters())


def flat_dim(input_shape: tuple[int, ...]) -> int:
    return math.prod(input_shape)


def image_shape(arch: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ConfigError(
            f"architecture {arch!r} needs image inputs (C, H, W) but the dataset gives shape "
            f"{tuple(input_shape)}; use an MLP architecture (resmlp, mlp) for vector data"
        )
    return input_shape


def signal_shape(arch: str, input_shape: tuple[int, ...]) -> tuple[int, int]:
    """(C, T): the channels and length of the sequence a 1-D architecture reads. A signal (T,) is one
    channel; (C, T) is read as it is; an image (C, H, W) as its raster sequence (C, H·W), row by row
    (the reading of sequential MNIST)."""
    if len(input_shape) == 1:
        return 1, input_shape[0]
    if len(input_shape) in (2, 3):
        return input_shape[0], math.prod(input_shape[1:])
    raise ConfigError(
        f"architecture {arch!r} reads signals (T,) or (C, T), or images as their raster sequence; "
        f"the dataset gives shape {tuple(input_shape)}"
    )


class AsSignal(nn.Module):
    """(B, *input_shape) -> (B, C, T), the reading of :func:`signal_shape` (a view, no copy)."""

    def __init__(self, channels: int, length: int):
        super().__init__()
        self.channels, self.length = channels, length

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], self.channels, self.length)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, length={self.length}"


def arch_shape(arch: str, cfg: ModelConfig) -> ArchShape:
    """``arch`` under ``cfg``, defaults filled in (models are built from it, reports name it)."""
    base = ARCHS.get(arch).defaults  # an unknown name fails here, naming the known ones
    pick = lambda value, default: default if value is None else value  # noqa: E731
    return ArchShape(
        cfg.d or base.d,
        pick(cfg.L, base.L),
        pick(cfg.out_ln, base.out_ln),
        pick(cfg.residual, base.residual),
    )


def per_sample_norm(h: Tensor) -> Tensor:
    """L2 norm over all non-batch dimensions: (B, ...) -> (B,)."""
    return h.flatten(1).norm(dim=1)


@contextlib.contextmanager
def preserved_buffers(module: nn.Module) -> Iterator[None]:
    """Run an extra forward pass without a trace: for the duration, BatchNorm layers in training
    mode normalise with the batch's statistics as always but neither update their running
    statistics nor count the batch (``track_running_stats`` is off). No buffer is written, so a
    graph that saved them (BatchNorm's backward in the trainer's local pass) stays valid, and the
    pass may run inside ``torch.func`` transforms, which refuse in-place writes to captured tensors.
    Layers in eval mode already read their running statistics without writing them."""
    switched = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    for m in switched:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in switched:
            m.track_running_stats = True


def true_grads(model: CreditNet, x: Tensor, y: Tensor) -> tuple[Forward, list[Tensor]]:
    """The reference gradient g_l = d CE_i / d h_l for every l, per sample (never divided by B).

    Computed as the gradient of the *summed* cross-entropy, so in a model whose samples interact
    (BatchNorm in training mode) g_l is still the exact gradient of that loss w.r.t. the tensor h_l.
    Parameter gradients and buffers (BatchNorm's running statistics) are left untouched, so it can
    be called in the middle of a training step. Returns the forward pass (detached) and g_0..g_L.

    Under a ``torch.func`` transform (a stack of runs, ``training/stack.py``), where autograd cannot
    reach the states, g_l is the derivative with respect to a zero offset added to h_l: the same
    tensor, by ``torch.func.vjp``.
    """
    if autodiff.under_transform():
        return _true_grads_transformed(model, x, y)
    with torch.enable_grad(), preserved_buffers(model):
        fwd = model.run(x)
        loss = nn.functional.cross_entropy(fwd.logits, y, reduction="sum")
        gs = torch.autograd.grad(loss, fwd.hs, allow_unused=False)
    detached = Forward(
        fwd.logits.detach(), [h.detach() for h in fwd.hs], [f.detach() for f in fwd.fs]
    )
    return detached, [g.detach() for g in gs]


def _true_grads_transformed(model: CreditNet, x: Tensor, y: Tensor) -> tuple[Forward, list[Tensor]]:
    def loss(*offsets: Tensor) -> tuple[Tensor, tuple[Tensor, list[Tensor], list[Tensor]]]:
        h = model.embed(x) + offsets[0]
        hs, fs = [h], []
        for block, offset in zip(model.blocks, offsets[1:], strict=True):
            h, f = block(h)
            h = h + offset
            hs.append(h)
            fs.append(f)
        logits = model.readout(h)
        return nn.functional.cross_entropy(logits, y, reduction="sum"), (logits, hs, fs)

    with torch.no_grad(), preserved_buffers(model):
        shapes, _ = model.shapes(tuple(x.shape[1:]))
        dtype = next(model.parameters()).dtype
        zeros = [
            torch.zeros((x.shape[0], *shape), dtype=dtype, device=x.device) for shape in shapes
        ]
        out, pullback, (logits, hs, fs) = torch.func.vjp(loss, *zeros, has_aux=True)  # type: ignore[misc]  # torch's stub: 2 or 3 values, whatever has_aux
        gs = pullback(torch.ones_like(out))
    return Forward(logits, hs, fs), list(gs)
