"""Pieces shared by the feedback-alignment rules (``dfa``, ``fa``, ``fa_layerwise``).

* the output error e_T = softmax(o) − onehot(y), per sample;
* fixed random matrices: every entry i.i.d., variance ``scale² / fan`` (``normal``: N(0, scale²/fan);
  ``uniform``: U(±scale·√(3/fan)), the same variance), drawn on the CPU so that they are the same
  on every device;
* :func:`feedback_generator`: ``setup`` draws one 62-bit seed from torch's global CPU RNG — seeded
  from the run seed right before the model is built, so the seed is a function of the run seed
  alone — and the matrices come from a private CPU generator seeded with it, in a fixed order. They
  are therefore a function of (run seed, model shapes) only, not of the device, the data or the
  batch; and being a fresh stream, they are not correlated with the model's own init, which came
  from the same global RNG.
* :func:`~creditaudit.models.base.preserved_buffers` (re-exported), so that an extra forward pass
  made to compute credits does not move BatchNorm's running statistics a second time in a step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as F

from creditaudit.models.base import preserved_buffers  # noqa: F401  (re-exported for the rules)

INITS = ("normal", "uniform")


def output_error(logits: Tensor, y: Tensor) -> Tensor:
    """e_T = softmax(o) − onehot(y), per sample: (B, C), detached."""
    logits = logits.detach()
    return torch.softmax(logits, dim=1) - F.one_hot(y, logits.shape[1]).to(logits.dtype)


def random_matrix(
    shape: tuple[int, ...],
    fan: int,
    init: str,
    scale: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """A CPU float32 tensor of i.i.d. entries with variance scale²/fan (``generator=None``: torch's
    global CPU RNG)."""
    if init == "normal":
        return torch.randn(shape, generator=generator) * (scale / math.sqrt(fan))
    if init == "uniform":
        bound = scale * math.sqrt(3.0 / fan)
        return (torch.rand(shape, generator=generator) * 2.0 - 1.0) * bound
    raise ValueError(f"unknown init {init!r}; expected one of {', '.join(INITS)}")


def feedback_generator() -> tuple[int, torch.Generator]:
    """A seed drawn from the global CPU RNG (seeded from the run seed) and a CPU generator made from it."""
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    return seed, torch.Generator(device="cpu").manual_seed(seed)
