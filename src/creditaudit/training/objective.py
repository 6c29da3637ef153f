"""The local update shared by every rule but plain BP (docs/science.md §1).

Given the local forward pass (block l saw ``sg(h_{l-1})``) and credits a_0..a_L, the objective is

    CE(H(N(sg h_L)), y)                         exact gradient for terminal norm and head
  + Σ_l  local(f_l(sg h_{l-1}), sg a_l)          each block, from its own credit
  + local(E(x), sg a_0)                         the embedding, from a_0
  + lam · Σ_l mean_b ||f_l||²                   optional per-block penalty on the branch output

One backward pass of this sum gives every parameter its local gradient: because every block's input
is detached, no gradient crosses a block boundary. With ``inner`` and a_l = g_l (lam = 0) this is
exactly autograd's gradient of the batch-mean CE, parameter for parameter.

Local rules (``local_rule``), all means over the batch of per-sample quantities:
- ``inner``:       <f_l, a_l>                          (sum over features)
- ``shift(eta)``:  ½ ||u_l − sg(u_l − eta·a_l/||a_l||)||²  with u_l the block's output h_l: the target
                   is fixed once, so the pull stops once it is reached (bounded)
- ``cosine``:      cos(f_l, a_l) (minimised, i.e. cos(f_l, −a_l) maximised): scale-free
The embedding follows the same rule, with u_0 = h_0 = E(x).

``shift(eta)``'s gradient with respect to u_l is eta·a_l/||a_l||: eta only scales it. Under the
trainer's AdamW, which divides each gradient by its own running scale, eta therefore changes
nothing but the balance against the penalty ``lam`` and Adam's eps: with lam = 0, shift(0.1) and
shift(1) train alike (at small eta, eps starts to matter where gradients are tiny). Under plain SGD
(``creditaudit exploit``'s local steps) eta is a step size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from creditaudit.errors import ConfigError
from creditaudit.models.base import Forward


@dataclass(frozen=True)
class LocalUpdate:
    kind: str  # "inner" | "shift" | "cosine"
    eta: float = 0.0

    def __str__(self) -> str:
        return f"shift({self.eta:g})" if self.kind == "shift" else self.kind


_SHIFT = re.compile(r"^shift\(\s*([0-9.eE+-]+)\s*\)$")


def parse_local_update(text: str) -> LocalUpdate:
    text = text.strip()
    if text in ("inner", "cosine"):
        return LocalUpdate(text)
    m = _SHIFT.match(text)
    if m:
        try:
            eta = float(m.group(1))
        except ValueError:
            eta = -1.0
        if eta > 0:
            return LocalUpdate("shift", eta)
    raise ConfigError(
        f"local_rule {text!r} is not one of: inner, cosine, shift(eta) with eta > 0 (e.g. shift(0.1))"
    )


def _per_sample(t: Tensor) -> Tensor:
    return t.flatten(1)


def local_term(rule: LocalUpdate, out: Tensor, state: Tensor, credit: Tensor) -> Tensor:
    """One block's local loss. ``out`` = f_l (graph to the block's parameters), ``state`` = h_l
    (graph to the same parameters: sg(h_{l-1}) + f_l, or f_l without skip), ``credit`` = a_l."""
    a = credit.detach()
    if rule.kind == "inner":
        return (_per_sample(out) * _per_sample(a)).sum(1).mean()
    if rule.kind == "cosine":
        return F.cosine_similarity(_per_sample(out), _per_sample(a), dim=1, eps=1e-12).mean()
    # shift(eta): regress the block's output state onto a target fixed from the current state.
    a_flat = _per_sample(a)
    direction = a_flat / a_flat.norm(dim=1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    u = _per_sample(state)
    target = (u - rule.eta * direction).detach()
    return 0.5 * (u - target).pow(2).sum(1).mean()


def local_objective(
    fwd: Forward,
    credits: list[Tensor],
    *,
    rule: LocalUpdate,
    lam: float | Tensor,
    train_blocks: bool,
) -> Tensor:
    """The sum above, without the CE readout term (the caller adds it). ``lam`` may be a 0-d tensor
    (a run's value in a stack), which always adds the penalty term."""
    if len(credits) != len(fwd.hs):
        raise ValueError(
            f"a rule returned {len(credits)} credits for {len(fwd.hs)} states h_0..h_L"
        )
    for l, (a, h) in enumerate(zip(credits, fwd.hs, strict=True)):
        if a.shape != h.shape:
            raise ValueError(
                f"credit a_{l} has shape {tuple(a.shape)} but h_{l} has {tuple(h.shape)}"
            )
    total = local_term(rule, fwd.hs[0], fwd.hs[0], credits[0])
    if train_blocks:
        for l in range(1, len(fwd.hs)):
            f = fwd.fs[l - 1]
            total = total + local_term(rule, f, fwd.hs[l], credits[l])
        if isinstance(lam, Tensor) or lam:
            total = total + penalty(fwd, lam)
    return total


def penalty(fwd: Forward, lam: float | Tensor) -> Tensor | float:
    """lam · Σ_l mean_b ||f_l||²: the per-block penalty on each branch output (every rule's, BP's too);
    the number 0 (times lam) for a model without blocks."""
    return lam * sum(_per_sample(f).pow(2).sum(1).mean() for f in fwd.fs)
