"""``vit_mini``: a small pre-LN vision transformer with a terminal LayerNorm on the cls token.

    h_0 = [cls; patchify(x) W_E] + pos                          (B, 1+P, d)
    f_l(h) = a + m,  a = Attn(LN h),  m = MLP(LN(h + a))         one pre-LN transformer block, so
    h_l = h_{l-1} + f_l(h_{l-1})                                  both of its residual adds are inside f_l
    z   = LN(h_L[:, 0])   (terminal LN on the cls token; identity when out_ln=False)
    o   = H(z)

Defaults: d=128, L=4, 4 heads, patch 4, MLP ratio 2.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from creditaudit.models.base import Block, CreditNet, ModelConfig, arch_shape, architecture, image_shape
from creditaudit.errors import ConfigError


class PatchEmbed(nn.Module):
    def __init__(self, channels: int, size: tuple[int, int], patch: int, d: int):
        super().__init__()
        h, w = size
        self.proj = nn.Conv2d(channels, d, kernel_size=patch, stride=patch)
        n_patches = (h // patch) * (w // patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, 1 + n_patches, d) * 0.02)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, 1+P, d)
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
        q, k, v = self.qkv(u).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # each (B, H, T, d/H)
        a = F.scaled_dot_product_attention(q, k, v)
        return self.proj(a.transpose(1, 2).reshape(B, T, d))


class TransformerBranch(nn.Module):
    """The residual branch of one pre-LN block: f(h) = a + MLP(LN(h + a)), a = Attn(LN h)."""

    def __init__(self, d: int, heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = SelfAttention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, mlp_ratio * d), nn.GELU(), nn.Linear(mlp_ratio * d, d))

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


@architecture("vit_mini", "patch embedding + cls token, pre-LN transformer blocks (d=128, L=4), terminal LN on cls",
              d=128, L=4, out_ln=True, residual=True, reads=("heads", "patch"),
              small={"d": 16, "L": 2, "heads": 2, "patch": 4})
def vit_mini(cfg: ModelConfig, input_shape: tuple, num_classes: int) -> CreditNet:
    c, h, w = image_shape("vit_mini", input_shape)
    shape = arch_shape("vit_mini", cfg)
    d, L = shape.d, shape.L
    if h % cfg.patch or w % cfg.patch:
        raise ConfigError(f"vit_mini: patch={cfg.patch} must divide the image size {h}x{w}")
    if d % cfg.heads:
        raise ConfigError(f"vit_mini: heads={cfg.heads} must divide d={d}")
    embed = PatchEmbed(c, (h, w), cfg.patch, d)
    blocks = [Block(TransformerBranch(d, cfg.heads), residual=shape.residual) for _ in range(L)]
    return CreditNet(embed, blocks, ClsNorm(d, shape.out_ln), nn.Linear(d, num_classes))
