"""The diagnostics' mathematics (docs/science.md §4), as pure functions of a model, a batch and credits.

Conventions. All norms are per-sample L2 norms over every non-batch dimension; a per-layer figure is
the median over the eval batch. Everything is computed in float64: a reference gradient of norm
1e-10 must not be rounded into noise. Cosines carry no eps clamp — ``torch.nn.functional.
cosine_similarity`` divides by max(‖a‖·‖b‖, eps) (eps = 1e-8), which, when ‖g‖ ≈ 1e-9, shrinks every
cosine against g by a factor of ~10 and makes a degenerate reference look like "no alignment".
A cosine with a zero vector is undefined and reported as NaN, never as 0.

Every figure is a 0-d float64 tensor, and no function reads a value back to the host or branches on
one: the probe runs them for one run, or under ``torch.func.vmap`` for a stack of runs
(``training/stack.py``), and reads the figures once at the end.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor
from torch.nn import functional as F

from creditaudit.models.base import CreditNet


def flat64(t: Tensor) -> Tensor:
    """(B, ...) -> (B, n) in float64."""
    return t.detach().flatten(1).double()


def norms(t: Tensor) -> Tensor:
    """Per-sample L2 norm, float64, (B,)."""
    return flat64(t).norm(dim=1)


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample cosine ⟨a, b⟩ / (‖a‖‖b‖) in float64 with no eps clamp, (B,); NaN where a norm is 0."""
    a64, b64 = flat64(a), flat64(b)
    denom = a64.norm(dim=1) * b64.norm(dim=1)
    return torch.where(denom > 0, (a64 * b64).sum(1) / denom, torch.full_like(denom, math.nan))


def nan_like(t: Tensor) -> Tensor:
    """A 0-d float64 NaN on ``t``'s device."""
    return torch.full((), math.nan, dtype=torch.float64, device=t.device)


def median(t: Tensor) -> Tensor:
    """Median of a 1-D tensor, ignoring NaNs (NaN if all are)."""
    return torch.nanmedian(t.double()) if t.numel() else nan_like(t)


def nanmean(values: list[Tensor], like: Tensor) -> Tensor:
    """Mean of 0-d tensors, ignoring NaNs (NaN if all are, or if there are none)."""
    return torch.nanmean(torch.stack(values).double()) if values else nan_like(like)


def nanmax(values: list[Tensor], like: Tensor) -> Tensor:
    """Largest of 0-d tensors, ignoring NaNs (NaN if all are, or if there are none)."""
    if not values:
        return nan_like(like)
    v = torch.stack(values).double()
    known = ~torch.isnan(v)
    return torch.where(known.any(), torch.where(known, v, -math.inf).max(), math.nan)


def quantiles(t: Tensor, qs: tuple[float, ...]) -> Tensor:
    """``torch.quantile(t, qs)`` (linear interpolation; NaN if any value is) for a 1-D tensor, as
    sorting and gathering: ``torch.quantile`` has no run-axis rule in ``vmap``."""
    s = torch.sort(t).values
    ranks = torch.tensor(qs, dtype=t.dtype, device=t.device) * (t.shape[0] - 1)
    below = ranks.floor()
    lo, hi = s[below.long()], s[ranks.ceil().long()]
    return torch.where(torch.isnan(s[-1]), math.nan, torch.lerp(lo, hi, ranks - below))


def scale_ratios(hs: list[Tensor]) -> list[Tensor]:
    """D1's per-block figure: median over the batch of ‖h_l‖ / ‖h_{l-1}‖, l = 1..L."""
    out = []
    for prev, cur in itertools.pairwise(hs):
        n_prev, n_cur = norms(prev), norms(cur)
        out.append(
            median(torch.where(n_prev > 0, n_cur / n_prev, torch.full_like(n_cur, math.inf)))
        )
    return out


def credit_cosines(credits: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
    """Γ_l = mean over the batch of cos(a_l, g_l), l = 0..L (NaN samples ignored)."""
    return [torch.nanmean(cosine(a, g)) for a, g in zip(credits, grads, strict=True)]


def per_sample_loss(model: CreditNet, l: int, h: Tensor, y: Tensor) -> Tensor:
    """CE_i of the rest of the model run from h_l, (B,) in the dtype of h."""
    return F.cross_entropy(model.forward_from(l, h), y, reduction="none")


@torch.no_grad()
def predictivity(
    model: CreditNet,
    l: int,
    h: Tensor,
    a: Tensor,
    y: Tensor,
    *,
    dirs: int,
    eps: float,
    generator: torch.Generator,
) -> Tensor:
    """ρ_l: Pearson correlation, over samples × ``dirs`` random unit directions v, between the
    predicted loss change ε⟨a_l, v⟩ and the actual change CE(h_l + εv) − CE(h_l). The forward passes
    run in the model's dtype (float64 when the changes can be tiny: see ``probe``), and so are the
    directions and the predicted changes; the correlation is computed in float64."""
    B = h.shape[0]
    dtype = next(model.parameters()).dtype
    h64, a64 = h.to(dtype), a.detach().flatten(1).to(dtype)
    base = per_sample_loss(model, l, h64, y)  # (B,)
    # Directions in chunks stacked along the batch: large matrix products instead of `dirs` small ones.
    chunk = max(1, min(dirs, 8192 // max(B, 1)))
    predicted, actual = [], []
    for start in range(0, dirs, chunk):
        k = min(chunk, dirs - start)
        v = torch.randn((k, *h64.shape), generator=generator, dtype=dtype).to(
            h64.device
        )  # (k, B, ...)
        v = v / v.flatten(2).norm(dim=2).view(k, B, *[1] * (h64.dim() - 1))
        predicted.append(
            eps * torch.einsum("bn,kbn->kb", a64, v.flatten(2)).flatten().double()
        )  # (k·B,)
        moved = (h64.unsqueeze(0) + eps * v).flatten(0, 1)  # (k·B, ...)
        actual.append((per_sample_loss(model, l, moved, y.repeat(k)) - base.repeat(k)).double())
    p, q = torch.cat(predicted), torch.cat(actual)
    return pearson(p, q)


def pearson(p: Tensor, q: Tensor) -> Tensor:
    p, q = p.double() - p.double().mean(), q.double() - q.double().mean()
    denom = p.norm() * q.norm()
    return torch.where(denom > 0, p @ q / denom, math.nan)


@torch.no_grad()
def nudge(
    model: CreditNet, l: int, h: Tensor, a: Tensor, y: Tensor, *, eta: float, relative: bool
) -> Tensor:
    """ΔL: change of the mean loss after moving h_l by η against a_l/‖a_l‖ (per sample; η scaled by
    ‖h_l‖ when ``relative``). Negative = the credit points downhill. Samples with a = 0 do not move."""
    h64 = h.double()
    a_flat = flat64(a)
    a_norm = a_flat.norm(dim=1, keepdim=True)
    direction = torch.where(a_norm > 0, a_flat / a_norm, torch.zeros_like(a_flat))
    step = eta * (norms(h).unsqueeze(1) if relative else 1.0)
    moved = h64 - (step * direction).view_as(h64)
    return (per_sample_loss(model, l, moved, y) - per_sample_loss(model, l, h64, y)).mean()


def gradient_stability(batch_grads: list[Tensor]) -> Tensor:
    """(c): mean pairwise cosine between the batch-mean gradients g (at one layer) of disjoint
    batches (pairs whose cosine is undefined ignored; NaN if all are)."""
    means = [flat64(g).mean(0, keepdim=True) for g in batch_grads]
    cos = [
        cosine(means[i], means[j])[0] for i in range(len(means)) for j in range(i + 1, len(means))
    ]
    return nanmean(cos, batch_grads[0])
