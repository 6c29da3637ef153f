"""``resmlp``: the primary audit architecture, a pre-LayerNorm residual MLP (docs/science.md §2).

    E   = Linear(in, d)
    f_l = W2 · GELU(W1 · LN(h)),  W1, W2 (d × d),  W2 ~ N(0, w2_std), b2 = 0
    N   = LayerNorm(d) when out_ln, else identity;  H = Linear(d, C)

``residual=False`` drops the skip path (h_l = f_l(h_{l-1})), the seed's falsification control.
"""

from __future__ import annotations

from torch import nn

from creditaudit.models.base import (
    Block,
    CreditNet,
    ModelConfig,
    arch_shape,
    architecture,
    flat_dim,
)


class ResMLPBranch(nn.Module):
    def __init__(self, d: int, w2_std: float):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, d)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d, d)
        nn.init.normal_(self.fc2.weight, std=w2_std)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h):  # (B, d) -> (B, d)
        return self.fc2(self.act(self.fc1(self.ln(h))))


@architecture(
    "resmlp",
    "pre-LN residual MLP: E=Linear, f_l=W2·GELU(W1·LN h), terminal LN, linear head",
    d=256,
    L=4,
    out_ln=True,
    residual=True,
    reads=("w2_std",),
    small={"d": 16, "L": 3},
)
def resmlp(cfg: ModelConfig, input_shape: tuple, num_classes: int) -> CreditNet:
    shape = arch_shape("resmlp", cfg)
    d, L = shape.d, shape.L
    embed = nn.Sequential(nn.Flatten(), nn.Linear(flat_dim(input_shape), d))
    blocks = [Block(ResMLPBranch(d, cfg.w2_std), residual=shape.residual) for _ in range(L)]
    norm = nn.LayerNorm(d) if shape.out_ln else nn.Identity()
    return CreditNet(embed, blocks, norm, nn.Linear(d, num_classes))
