"""The per-epoch probe: every diagnostic figure of docs/science.md §4 for one run at one epoch, on a fixed
held-out eval batch (the first ``eval_n`` test examples — the same for every run, seed and epoch).

Logged keys (namespaced, one JSON line per epoch in ``metrics.jsonl``):

- ``diag/d1``            D1, max over blocks of median ‖h_l‖/‖h_{l−1}‖ (``diag/ratio_l{l}`` each block)
- ``diag/hL_norm``       median ‖h_L‖;  ``diag/h0_norm`` median ‖h_0‖
- ``diag/gL_norm``       D2, median ‖g_L‖ of the reference gradient (float64)
- ``credit/cos_l{l}``    Γ_l, mean cos(a_l, g_l), l = 0..L;  ``credit/deep_cos`` their mean over l = 1..L
- ``credit/nudge``       ΔL of a step η against a_l/‖a_l‖, mean over l = 1..L (``credit/nudge_l{l}``)
- ``credit/rho_l{l}``    ρ_l, predicted vs. actual loss change (``credit/rho_deep``: mean over l = 1..L)
- ``diag/grad_stab``     (c), mean pairwise cosine of batch-mean g at layer ⌈L/2⌉ over disjoint batches
- ``diag/train_loss_fixed``  mean CE on a fixed training subset (for the training-loss decrease)
- ``traj/{h,g,a}_l{l}_{p10,p50,p90,mean}``  with ``trajectory=true`` (the snapshot-evolution setting):
  quantiles and mean of the per-sample norms of the state h_l, the reference gradient g_l and the
  rule's credit a_l at every layer l = 0..L, so the state trajectories can be plotted per epoch

ρ_l (l = 1..L) and (c) are the expensive ones: they run after the last epoch and every
``full_every`` epochs; the rest every ``every`` epochs and at epoch 0 (before any update). The probe runs with the
model in eval mode, never moves a parameter, a buffer or the training RNG.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn import functional as F

from creditaudit.diagnostics import measures as M
from creditaudit.models.base import CreditNet, true_grads


# ε·median‖g_l‖ above which ρ_l's forward passes run in float32: float32's error on a per-sample
# CE difference is ~1e-7, so changes of at least 2e-6 are measured to a few percent, which moves a
# correlation by far less than its seed-to-seed spread. Below that (a collapsing reference), float64.
RHO_FLOAT32_MIN_CHANGE = 2e-6


@dataclass
class DiagConfig:
    """When and how the per-epoch diagnostics are taken (thresholds belong to the audit)."""

    enabled: bool = field(default=True, metadata={"help": "take the per-epoch diagnostics (D1, D2, (c), Γ_l, ρ_l, nudging)"})
    eval_n: int = field(default=256, metadata={"help": "size of the fixed held-out eval batch (the first n test examples)"})
    every: int = field(default=1, metadata={"help": "probe D1, D2, Γ_l and nudging every N epochs (epoch 0 and the last always)"})
    full_every: int = field(default=0, metadata={"help": "also probe ρ_l and (c) every N epochs; 0 = only after the last epoch"})
    rho_dirs: int = field(default=32, metadata={"help": "ρ_l: random unit directions per sample"})
    rho_n: int = field(default=1024, metadata={"help": "ρ_l: samples (the first n test examples)"})
    rho_eps: float = field(default=1e-3, metadata={"help": "ρ_l: step ε along each direction"})
    nudge_eta: float = field(default=0.01, metadata={"help": "nudging: step η against a_l/‖a_l‖"})
    nudge_relative: bool = field(default=False, metadata={"help": "nudging: scale η by ‖h_l‖ (default: absolute step, as in the seed)"})
    stab_batches: int = field(default=8, metadata={"help": "(c): number of disjoint batches (>= 2)"})
    stab_batch_size: int = field(default=128, metadata={"help": "(c): size of each batch"})
    trajectory: bool = field(default=False, metadata={"help": "also log per-layer quantiles (10/50/90%) and means of "
                                                               "‖h_l‖, ‖g_l‖ and ‖a_l‖ at every probe (traj/* keys)"})


def due(cfg: DiagConfig, epoch: int, last: int) -> tuple[bool, bool]:
    """(probe at all, full probe) for ``epoch`` (0 = before training) of a run of ``last`` epochs."""
    if not cfg.enabled:
        return False, False
    cheap = epoch in (0, last) or (cfg.every > 0 and epoch % cfg.every == 0)
    full = epoch == last or (cfg.full_every > 0 and epoch % cfg.full_every == 0)
    return cheap or full, full


def _credits(model: CreditNet, rule: Any, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    with rule.local_forward(model):
        fwd = model.run(x, detach_inputs=True)
        return [a.detach() for a in rule.credits(model, x, y, fwd)]


TRAJECTORY_QUANTILES = (0.1, 0.5, 0.9)


def trajectory_summaries(named: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """``traj/<name>_l<l>_p10|p50|p90|mean``: the spread of the per-sample norms of each layer's
    tensor (float64, so a collapsing ‖g_l‖ of 1e-10 is still resolved)."""
    out: dict[str, float] = {}
    for name, tensors in named.items():
        for l, t in enumerate(tensors):
            norms = M.norms(t).double()
            qs = torch.quantile(norms, torch.tensor(TRAJECTORY_QUANTILES, dtype=norms.dtype, device=norms.device))
            for q, v in zip(TRAJECTORY_QUANTILES, qs.tolist()):
                out[f"traj/{name}_l{l}_p{round(q * 100)}"] = v
            out[f"traj/{name}_l{l}_mean"] = float(norms.mean())
    return out


def probe(model: CreditNet, rule: Any, data: Any, cfg: DiagConfig, *, full: bool, seed: int) -> dict[str, float]:
    """All figures for the current state of ``model`` trained by ``rule`` (see the module docstring)."""
    was_training = model.training
    model.eval()
    rng_state = torch.get_rng_state()
    try:
        return _probe(model, rule, data, cfg, full=full, seed=seed)
    finally:
        torch.set_rng_state(rng_state)
        model.train(was_training)


def _probe(model: CreditNet, rule: Any, data: Any, cfg: DiagConfig, *, full: bool, seed: int) -> dict[str, float]:
    out: dict[str, float] = {}
    n_test = data.x_test.shape[0]
    n = min(cfg.eval_n, n_test)
    m = min(cfg.rho_n, n_test) if full else n  # ρ_l wants its own sample count: one reference for both
    x_all, y_all = data.x_test[:max(n, m)], data.y_test[:max(n, m)]
    L = model.L
    # The reference in float64 (a copy: the model itself is untouched).
    model64 = copy.deepcopy(model).double()
    fwd64, gs_all = true_grads(model64, x_all.double(), y_all)
    credits_all = _credits(model, rule, x_all, y_all)
    y = y_all[:n]
    hs, gs, credits = [h[:n] for h in fwd64.hs], [g[:n] for g in gs_all], [a[:n] for a in credits_all]

    ratios = M.scale_ratios(hs)
    for l, r in enumerate(ratios, start=1):
        out[f"diag/ratio_l{l}"] = r
    out["diag/d1"] = max(ratios) if ratios else math.nan
    out["diag/h0_norm"] = M.median(M.norms(hs[0]))
    out["diag/hL_norm"] = M.median(M.norms(hs[-1]))
    out["diag/gL_norm"] = M.median(M.norms(gs[-1]))

    if cfg.trajectory:
        out.update(trajectory_summaries({"h": hs, "g": gs, "a": credits}))

    with torch.no_grad():
        xt = data.x_train[:n]
        out["diag/train_loss_fixed"] = float(F.cross_entropy(model(xt), data.y_train[:n]).item())

    gammas = M.credit_cosines(credits, gs)
    for l, g in enumerate(gammas):
        out[f"credit/cos_l{l}"] = g
    deep = range(1, L + 1)
    out["credit/deep_cos"] = _mean(gammas[l] for l in deep)
    nudges = {l: M.nudge(model64, l, hs[l], credits[l], y, eta=cfg.nudge_eta, relative=cfg.nudge_relative) for l in deep}
    for l, v in nudges.items():
        out[f"credit/nudge_l{l}"] = v
    out["credit/nudge"] = _mean(nudges.values())

    if full:
        gen = torch.Generator().manual_seed(seed)
        yr, hs_r, credits_r = y_all[:m], [h[:m] for h in fwd64.hs], [a[:m] for a in credits_all]
        rhos = {}
        for l in deep:
            # float32 suffices when the loss changes ε‖g_l‖ are far above its rounding (~1e-7·CE);
            # a collapsed reference (‖g‖ ~ 1e-9) is measured in float64.
            big = cfg.rho_eps * M.median(M.norms(gs_all[l][:m])) >= RHO_FLOAT32_MIN_CHANGE
            rhos[l] = M.predictivity(model if big else model64, l, hs_r[l], credits_r[l], yr, dirs=cfg.rho_dirs,
                                     eps=cfg.rho_eps, generator=gen)
        for l, v in rhos.items():
            out[f"credit/rho_l{l}"] = v
        out["credit/rho_deep"] = _mean(rhos[l] for l in deep)
        out["diag/grad_stab"] = _grad_stability(model64, data, L, cfg)
    return out


def _grad_stability(model64: CreditNet, data: Any, L: int, cfg: DiagConfig) -> float:
    layer = math.ceil(L / 2)
    bs, k = cfg.stab_batch_size, cfg.stab_batches
    k = min(k, data.x_test.shape[0] // bs)
    if k < 2:
        return math.nan
    grads = []
    for i in range(k):
        xb, yb = data.x_test[i * bs:(i + 1) * bs], data.y_test[i * bs:(i + 1) * bs]
        grads.append(true_grads(model64, xb.double(), yb)[1][layer])
    return M.gradient_stability(grads)


def _mean(values) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan
