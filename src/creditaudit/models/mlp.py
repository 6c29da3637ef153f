"""``mlp``: the plain MLP of the FA/DFA literature — no residual path, no normalisation.

    h_0 = φ(W_0 x)                 (the first hidden layer is the embedding)
    h_l = φ(W_l h_{l-1})           l = 1..L   (non-residual blocks: f_l is the whole layer)
    o   = H(h_L)                   (no terminal norm)

So ``L`` hidden-to-hidden layers give L+1 hidden layers of width ``d``; φ = ``activation``.
"""

from __future__ import annotations

from torch import nn

from creditaudit.errors import ConfigError
from creditaudit.models.base import (
    Block,
    CreditNet,
    ModelConfig,
    arch_shape,
    architecture,
    flat_dim,
)

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ConfigError(
            f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}"
        ) from None


@architecture(
    "mlp",
    "plain MLP (width d, L hidden-to-hidden layers, activation); no skip path, no norm unless asked",
    d=256,
    L=3,
    out_ln=False,
    residual=False,
    reads=("activation",),
    small={"d": 16, "L": 2, "activation": "tanh"},
)
def mlp(cfg: ModelConfig, input_shape: tuple, num_classes: int) -> CreditNet:
    shape = arch_shape("mlp", cfg)
    d, L = shape.d, shape.L
    embed = nn.Sequential(
        nn.Flatten(), nn.Linear(flat_dim(input_shape), d), activation(cfg.activation)
    )
    blocks = [
        Block(nn.Sequential(nn.Linear(d, d), activation(cfg.activation)), residual=shape.residual)
        for _ in range(L)
    ]
    norm = nn.LayerNorm(d) if shape.out_ln else nn.Identity()
    return CreditNet(embed, blocks, norm, nn.Linear(d, num_classes))
