"""Pieces shared by the feedback-alignment rules (``dfa``, ``fa``, ``fa_layerwise``).

* the output error e_T = softmax(o) − onehot(y), per sample;
* fixed random matrices: every entry i.i.d., variance ``scale² / fan`` (``normal``: N(0, scale²/fan);
  ``uniform``: U(±scale·√(3/fan)), the same variance), drawn on the CPU so that they are the same
  on every device;
* :class:`LazyFeedback`, for rules whose matrices need the shapes of the states h_l, which ``setup``
  does not know (the run context has no input shape): ``setup`` draws one 62-bit seed from torch's
  global CPU RNG — seeded from the run seed right before the model is built, so the seed is a
  function of the run seed alone — and the matrices are drawn from a private CPU generator seeded
  with it when the first batch shows the shapes. The matrices are therefore a function of (run
  seed, model shapes) only, not of the device, the data or the batch; and being a fresh stream,
  they are not correlated with the model's own init, which came from the same global RNG.
* :func:`preserved_buffers`, so that an extra forward pass made to compute credits does not move
  BatchNorm's running statistics a second time in a step.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.nn import functional as F

INITS = ("normal", "uniform")


def check_choice(rule: str, option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        from creditaudit.config import ConfigError

        raise ConfigError(f"{rule}.{option}={value!r}: expected one of {', '.join(choices)}")


def check_positive(rule: str, option: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        from creditaudit.config import ConfigError

        raise ConfigError(f"{rule}.{option}={value!r}: must be a finite number > 0")


def output_error(logits: Tensor, y: Tensor) -> Tensor:
    """e_T = softmax(o) − onehot(y), per sample: (B, C), detached."""
    logits = logits.detach()
    return torch.softmax(logits, dim=1) - F.one_hot(y, logits.shape[1]).to(logits.dtype)


def random_matrix(shape: tuple[int, ...], fan: int, init: str, scale: float,
                  generator: torch.Generator | None = None) -> Tensor:
    """A CPU float32 tensor of i.i.d. entries with variance scale²/fan (``generator=None``: torch's
    global CPU RNG)."""
    if init == "normal":
        return torch.randn(shape, generator=generator) * (scale / math.sqrt(fan))
    if init == "uniform":
        bound = scale * math.sqrt(3.0 / fan)
        return (torch.rand(shape, generator=generator) * 2.0 - 1.0) * bound
    raise ValueError(f"unknown init {init!r}; expected one of {', '.join(INITS)}")


class LazyFeedback:
    """A seed drawn in ``setup`` from the global CPU RNG, and a CPU generator made from it when the
    matrices are first drawn (see the module docstring)."""

    def __init__(self) -> None:
        self.seed: int | None = None

    def draw_seed(self) -> None:
        self.seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))

    def generator(self, rule: str) -> torch.Generator:
        if self.seed is None:
            raise RuntimeError(f"rule {rule!r}: call setup(model, ctx) before asking for credits")
        return torch.Generator(device="cpu").manual_seed(self.seed)


@contextlib.contextmanager
def preserved_buffers(module: nn.Module) -> Iterator[None]:
    """Run an extra forward pass without a trace: every buffer (BatchNorm's running mean/var and
    batch counter) is swapped for a copy for the duration and the original tensor put back after.
    The originals are never written to, so a graph that saved them (BatchNorm's backward in the
    trainer's local pass) stays valid. Outputs in training mode use batch statistics, so they do
    not depend on this."""
    saved = []
    for m in module.modules():
        for name, b in m._buffers.items():
            if b is not None:
                saved.append((m, name, b))
                m._buffers[name] = b.clone()
    try:
        yield
    finally:
        for m, name, b in saved:
            m._buffers[name] = b
