"""Architectures by name. Importing this package registers every built-in architecture."""

from creditaudit.models import mlp, resmlp, smallcnn, vit_mini  # noqa: F401  (registration)
from creditaudit.models.base import (
    ARCHS,
    Block,
    CreditNet,
    Forward,
    ModelConfig,
    build_model,
    per_sample_norm,
    true_grads,
)

__all__ = [
    "ARCHS",
    "Block",
    "CreditNet",
    "Forward",
    "ModelConfig",
    "build_model",
    "per_sample_norm",
    "true_grads",
]
