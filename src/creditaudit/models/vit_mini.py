"""``vit_mini``: a small pre-LN vision transformer with a terminal LayerNorm on the cls token.

    h_0 = [cls; patchify(x) W_E] + pos                          (B, 1+P, d)
    f_l(h) = a + m,  a = Attn(LN h),  m = MLP(LN(h + a))         one pre-LN transformer block, so
    h_l = h_{l-1} + f_l(h_{l-1})                                  both of its residual adds are inside f_l
    z   = LN(h_L[:, 0])   (terminal LN on the cls token; identity when out_ln=False)
    o   = H(z)

Defaults: d=128, L=4, 4 heads, patch 4, MLP ratio 2.

``vit_mini1d`` is the same transformer on 1-D signals: the tokens are patches of ``patch`` samples
of the sequence (a Conv1d of that kernel and stride), so MNIST-1D's 40 samples give 10 patches and a
cls token; an input (T,) is one channel, an image is read as its raster sequence
(``models.base.signal_shape``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from creditaudit.errors import ConfigError
from creditaudit.models.base import (
    AsSignal,
    Block,
    CreditNet,
    ModelConfig,
    arch_shape,
    architecture,
    image_shape,
    signal_shape,
)


class PatchEmbed(nn.Module):
    """Non-overlapping patches of an image (two spatial axes) or a sequence (one), each projected to
    d, behind a cls token, plus learned positions: (B, C, *size) -> (B, 1+P, d)."""

    def __init__(self, channels: int, size: tuple[int, ...], patch: int, d: int):
        super().__init__()
        conv = nn.Conv2d if len(size) == 2 else nn.Conv1d
        self.proj = conv(channels, d, kernel_size=patch, stride=patch)
        n_patches = math.prod(n // patch for n in size)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 1 + n_patches, d) * 0.02)

    def forward(self, x: Tensor) -> Tensor:
        p = self.proj(x).flatten(2).transpose(1, 2)
        cls = self.cls.expand(p.shape[0], -1, -1)
        return torch.cat([cls, p], dim=1) + self.pos


class SelfAttention(nn.Module):
    """Multi-head self-attention written with plain ``nn.Linear`` projections, so that rules which
    replace weight transposes (``fa_layerwise``) see every matrix of the model."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, u: Tensor) -> Tensor:  # (B, T, d) -> (B, T, d)
        B, T, d = u.shape
        q, k, v = (
            self.qkv(u).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        )  # each (B, H, T, d/H)
        a = F.scaled_dot_product_attention(q, k, v)
        return self.proj(a.transpose(1, 2).reshape(B, T, d))


class TransformerBranch(nn.Module):
    """The residual branch of one pre-LN block: f(h) = a + MLP(LN(h + a)), a = Attn(LN h)."""

    def __init__(self, d: int, heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = SelfAttention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(
            nn.Linear(d, mlp_ratio * d), nn.GELU(), nn.Linear(mlp_ratio * d, d)
        )

    def forward(self, h: Tensor) -> Tensor:  # (B, T, d) -> (B, T, d)
        a = self.attn(self.ln1(h))
        return a + self.mlp(self.ln2(h + a))


class ClsNorm(nn.Module):
    """Terminal norm on the cls token: (B, T, d) -> (B, d)."""

    def __init__(self, d: int, use_ln: bool):
        super().__init__()
        self.ln = nn.LayerNorm(d) if use_ln else nn.Identity()

    def forward(self, h: Tensor) -> Tensor:
        return self.ln(h[:, 0])


_SMALL = {"d": 16, "L": 2, "heads": 2, "patch": 4}


@architecture(
    "vit_mini",
    "patch embedding + cls token, pre-LN transformer blocks (d=128, L=4), terminal LN on cls",
    d=128,
    L=4,
    out_ln=True,
    residual=True,
    reads=("heads", "patch"),
    small=_SMALL,
)
def vit_mini(cfg: ModelConfig, input_shape: tuple, num_classes: int) -> CreditNet:
    c, h, w = image_shape("vit_mini", input_shape)
    return _build("vit_mini", cfg, c, (h, w), None, num_classes)


@architecture(
    "vit_mini1d",
    "vit_mini on 1-D signals: tokens are patches of the sequence (patch samples each), cls token, terminal LN",
    d=128,
    L=4,
    out_ln=True,
    residual=True,
    reads=("heads", "patch"),
    small=_SMALL,
)
def vit_mini1d(cfg: ModelConfig, input_shape: tuple, num_classes: int) -> CreditNet:
    c, t = signal_shape("vit_mini1d", input_shape)
    return _build("vit_mini1d", cfg, c, (t,), AsSignal(c, t), num_classes)


def _build(
    arch: str,
    cfg: ModelConfig,
    c: int,
    size: tuple[int, ...],
    reader: nn.Module | None,
    num_classes: int,
) -> CreditNet:
    """The transformer on inputs of ``c`` channels and spatial ``size`` (one or two axes); ``reader``,
    if any, brings the dataset's inputs into the (B, c, *size) layout first."""
    shape = arch_shape(arch, cfg)
    d, L = shape.d, shape.L
    if any(n % cfg.patch for n in size):
        raise ConfigError(
            f"{arch}: patch={cfg.patch} must divide the input size {'x'.join(map(str, size))}"
        )
    if d % cfg.heads:
        raise ConfigError(f"{arch}: heads={cfg.heads} must divide d={d}")
    embed: nn.Module = PatchEmbed(c, size, cfg.patch, d)
    if reader is not None:
        embed = nn.Sequential(reader, embed)
    blocks = [Block(TransformerBranch(d, cfg.heads), residual=shape.residual) for _ in range(L)]
    return CreditNet(embed, blocks, ClsNorm(d, shape.out_ln), nn.Linear(d, num_classes))
