"""``mlp``: the plain MLP of the FA/DFA literature — no residual path, no normalisation.

    h_0 = φ(W_0 x)                 (the first hidden layer is the embedding)
    h_l = φ(W_l h_{l-1})           l = 1..L   (non-residual blocks: f_l is the whole layer)
    o   = H(h_L)                   (no terminal norm)

So ``L`` hidden-to-hidden layers give L+1 hidden layers of width ``d``; φ = ``activation``.
"""
from __future__ import annotations

from torch import nn

from creditaudit.models.base import ARCHS, Block, CreditNet, ModelConfig, check_depth, flat_dim, model_size
from creditaudit.errors import ConfigError

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ConfigError(f"unknown activation {name!r}; choose one of {', '.join(ACTIVATIONS)}") from None


@ARCHS.register("mlp", "plain MLP (width d, L hidden-to-hidden layers, activation), no residual, no norm")
def mlp(cfg: ModelConfig, input_shape: tuple, num_classes: int) -> CreditNet:
    d, L = model_size("mlp", cfg)
    L = check_depth("mlp", L)
    embed = nn.Sequential(nn.Flatten(), nn.Linear(flat_dim(input_shape), d), activation(cfg.activation))
    blocks = [Block(nn.Sequential(nn.Linear(d, d), activation(cfg.activation)), residual=False) for _ in range(L)]
    return CreditNet(embed, blocks, nn.Identity(), nn.Linear(d, num_classes))
