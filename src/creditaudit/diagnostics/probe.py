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

The probe has two parts. :func:`shared_figures` is everything but ρ_l: tensors in, 0-d tensors
out, no value read back to the host — a stack of runs (``training/stack.py``) evaluates it for all its
runs at once under ``torch.func.vmap``, as it does the training step. :func:`finish` reads the
figures and measures ρ_l, one run at a time: its random directions are the run's own and its
precision is chosen per run and layer (:data:`RHO_FLOAT32_MIN_CHANGE`), and each of its forward
passes already stacks ``rho_dirs`` perturbed copies of the samples along the batch, which fills a
device on its own.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from creditaudit.diagnostics import measures
from creditaudit.models.base import CreditNet, true_grads
from creditaudit.typedconfig import Config

# ε·median‖g_l‖ above which ρ_l's forward passes run in float32: float32's error on a per-sample
# CE difference is ~1e-7, so changes of at least 2e-6 are measured to a few percent, which moves a
# correlation by far less than its seed-to-seed spread. Below that (a collapsing reference), float64.
RHO_FLOAT32_MIN_CHANGE = 2e-6


@dataclass
class DiagConfig(Config):
    """When and how the per-epoch diagnostics are taken (thresholds belong to the audit)."""

    enabled: bool = field(
        default=True,
        metadata={"help": "take the per-epoch diagnostics (D1, D2, (c), Γ_l, ρ_l, nudging)"},
    )
    eval_n: int = field(
        default=256,
        metadata={"help": "size of the fixed held-out eval batch (the first n test examples)"},
    )
    every: int = field(
        default=1,
        metadata={
            "help": "probe D1, D2, Γ_l and nudging every N epochs (epoch 0 and the last always)"
        },
    )
    full_every: int = field(
        default=0,
        metadata={"help": "also probe ρ_l and (c) every N epochs; 0 = only after the last epoch"},
    )
    rho_dirs: int = field(default=32, metadata={"help": "ρ_l: random unit directions per sample"})
    rho_n: int = field(default=1024, metadata={"help": "ρ_l: samples (the first n test examples)"})
    rho_eps: float = field(default=1e-3, metadata={"help": "ρ_l: step ε along each direction"})
    nudge_eta: float = field(default=0.01, metadata={"help": "nudging: step η against a_l/‖a_l‖"})
    nudge_relative: bool = field(
        default=False,
        metadata={"help": "nudging: scale η by ‖h_l‖ (default: absolute step, as in the seed)"},
    )
    stab_batches: int = field(
        default=8, metadata={"help": "(c): number of disjoint batches (>= 2)"}
    )
    stab_batch_size: int = field(default=128, metadata={"help": "(c): size of each batch"})
    trajectory: bool = field(
        default=False,
        metadata={
            "help": "also log per-layer quantiles (10/50/90%) and means of "
            "‖h_l‖, ‖g_l‖ and ‖a_l‖ at every probe (traj/* keys)"
        },
    )


def due(cfg: DiagConfig, epoch: int, last: int) -> tuple[bool, bool]:
    """(probe at all, full probe) for ``epoch`` (0 = before training) of a run of ``last`` epochs."""
    if not cfg.enabled:
        return False, False
    cheap = epoch in (0, last) or (cfg.every > 0 and epoch % cfg.every == 0)
    full = epoch == last or (cfg.full_every > 0 and epoch % cfg.full_every == 0)
    return cheap or full, full


def _credits(model: CreditNet, rule: Any, x: Tensor, y: Tensor) -> list[Tensor]:
    with rule.local_forward(model):
        fwd = model.run(x, detach_inputs=True)
        return [a.detach() for a in rule.credits(model, x, y, fwd)]


TRAJECTORY_QUANTILES = (0.1, 0.5, 0.9)


def trajectory_summaries(named: dict[str, list[Tensor]]) -> dict[str, Tensor]:
    """``traj/<name>_l<l>_p10|p50|p90|mean``: the spread of the per-sample norms of each layer's
    tensor (float64, so a collapsing ‖g_l‖ of 1e-10 is still resolved)."""
    out: dict[str, Tensor] = {}
    for name, tensors in named.items():
        for l, t in enumerate(tensors):
            norms = measures.norms(t).double()
            qs = measures.quantiles(norms, TRAJECTORY_QUANTILES)
            for i, q in enumerate(TRAJECTORY_QUANTILES):
                out[f"traj/{name}_l{l}_p{round(q * 100)}"] = qs[i]
            out[f"traj/{name}_l{l}_mean"] = norms.mean()
    return out


@dataclass(frozen=True)
class Sizes:
    """How many examples each part of a probe reads (from the data's sizes and the config)."""

    full: bool  # ρ_l and (c) too
    n: int  # the eval batch: D1, D2, Γ_l, nudging, trajectories, the fixed training loss
    m: int  # ρ_l's samples (n when the probe is not full)
    stab: int  # (c)'s disjoint batches (0 when too few test examples for two)

    @classmethod
    def of(cls, data: Any, cfg: DiagConfig, *, full: bool) -> Sizes:
        n_test = data.x_test.shape[0]
        k = min(cfg.stab_batches, n_test // cfg.stab_batch_size)
        n = min(cfg.eval_n, n_test)
        return cls(
            full=full,
            n=n,
            m=min(cfg.rho_n, n_test) if full else n,
            stab=k if full and k >= 2 else 0,
        )


def probe_inputs(data: Any, cfg: DiagConfig, sizes: Sizes) -> dict[str, Tensor]:
    """The examples a probe reads: the first test examples (the reference batch, and (c)'s batches),
    and the first training examples (the fixed training loss)."""
    rows = max(sizes.n, sizes.m)
    inputs = {
        "x": data.x_test[:rows],
        "y": data.y_test[:rows],
        "x_train": data.x_train[: sizes.n],
        "y_train": data.y_train[: sizes.n],
    }
    if sizes.stab:
        bs = cfg.stab_batch_size
        inputs["x_stab"] = data.x_test[: sizes.stab * bs].reshape(
            sizes.stab, bs, *data.x_test.shape[1:]
        )
        inputs["y_stab"] = data.y_test[: sizes.stab * bs].reshape(sizes.stab, bs)
    return inputs


def probe(
    model: CreditNet, rule: Any, data: Any, cfg: DiagConfig, *, full: bool, seed: int
) -> dict[str, float]:
    """All figures for the current state of ``model`` trained by ``rule`` (see the module docstring)."""
    with probing(model):
        sizes = Sizes.of(data, cfg, full=full)
        inputs = probe_inputs(data, cfg, sizes)
        model64 = copy.deepcopy(
            model
        ).double()  # the reference in float64 (a copy: the model is untouched)
        figures, rho_inputs = shared_figures(model, model64, rule, inputs, cfg, sizes)
        return finish(
            figures, rho_inputs, model, lambda: model64, inputs["y"][: sizes.m], cfg, seed=seed
        )


class probing:
    """The model in eval mode and the training RNG untouched, for the duration of a probe."""

    def __init__(self, model: CreditNet):
        self.model = model

    def __enter__(self) -> None:
        self.was_training = self.model.training
        self.model.eval()
        self.rng_state = torch.get_rng_state()

    def __exit__(self, *exc: Any) -> None:
        torch.set_rng_state(self.rng_state)
        self.model.train(self.was_training)


def shared_figures(
    model: CreditNet,
    model64: CreditNet,
    rule: Any,
    inputs: dict[str, Tensor],
    cfg: DiagConfig,
    sizes: Sizes,
) -> tuple[dict[str, Tensor], dict[str, list[Tensor]]]:
    """Every figure but ρ_l, as 0-d tensors, and what ρ_l reads (``{}`` unless the probe is full):
    the states h_l and credits a_l of its samples, and the median ‖g_l‖ that sets its precision.
    ``model64`` is ``model`` in float64. Nothing here reads a value back or draws a random number."""
    out: dict[str, Tensor] = {}
    n, m = sizes.n, sizes.m
    x_all, y_all = inputs["x"], inputs["y"]
    L = model.L
    fwd64, gs_all = true_grads(model64, x_all.double(), y_all)
    credits_all = _credits(model, rule, x_all, y_all)
    y = y_all[:n]
    hs, gs, credits = (
        [h[:n] for h in fwd64.hs],
        [g[:n] for g in gs_all],
        [a[:n] for a in credits_all],
    )

    ratios = measures.scale_ratios(hs)
    for l, r in enumerate(ratios, start=1):
        out[f"diag/ratio_l{l}"] = r
    out["diag/d1"] = measures.nanmax(ratios, like=hs[0])
    out["diag/h0_norm"] = measures.median(measures.norms(hs[0]))
    out["diag/hL_norm"] = measures.median(measures.norms(hs[-1]))
    out["diag/gL_norm"] = measures.median(measures.norms(gs[-1]))

    if cfg.trajectory:
        out.update(trajectory_summaries({"h": hs, "g": gs, "a": credits}))

    with torch.no_grad():
        out["diag/train_loss_fixed"] = F.cross_entropy(
            model(inputs["x_train"]), inputs["y_train"]
        ).double()

    gammas = measures.credit_cosines(credits, gs)
    for l, g in enumerate(gammas):
        out[f"credit/cos_l{l}"] = g
    deep = range(1, L + 1)
    out["credit/deep_cos"] = measures.nanmean([gammas[l] for l in deep], like=hs[0])
    nudges = {
        l: measures.nudge(
            model64, l, hs[l], credits[l], y, eta=cfg.nudge_eta, relative=cfg.nudge_relative
        )
        for l in deep
    }
    for l, v in nudges.items():
        out[f"credit/nudge_l{l}"] = v
    out["credit/nudge"] = measures.nanmean(list(nudges.values()), like=hs[0])

    rho_inputs: dict[str, list[Tensor]] = {}
    if sizes.full:
        rho_inputs = {
            "h": [h[:m] for h in fwd64.hs],
            "a": [a[:m] for a in credits_all],
            "g_median": [measures.median(measures.norms(g[:m])) for g in gs_all],
        }
        out["diag/grad_stab"] = (
            _grad_stability(model64, inputs, L) if sizes.stab else measures.nan_like(hs[0])
        )
    return out, rho_inputs


def finish(
    figures: dict[str, Tensor],
    rho_inputs: dict[str, list[Tensor]],
    model: CreditNet,
    model64: Callable[[], CreditNet],
    y: Tensor,
    cfg: DiagConfig,
    *,
    seed: int,
) -> dict[str, float]:
    """The figures read back, and ρ_l measured when the probe is full (``rho_inputs`` from
    :func:`shared_figures`; ``y`` the labels of its samples; ``model64`` makes the float64 copy
    when a layer's changes are too small for float32). One run's: its directions come from ``seed``."""
    out = {k: float(v) for k, v in figures.items()}
    if not rho_inputs:
        return out
    gen = torch.Generator().manual_seed(seed)
    deep = range(1, len(rho_inputs["h"]))
    rhos = {}
    in_float64 = functools.cache(model64)  # made at most once, and only when a layer needs it
    for l in deep:
        # float32 suffices when the loss changes ε‖g_l‖ are far above its rounding (~1e-7·CE);
        # a collapsed reference (‖g‖ ~ 1e-9) is measured in float64.
        big = cfg.rho_eps * float(rho_inputs["g_median"][l]) >= RHO_FLOAT32_MIN_CHANGE
        rhos[l] = float(
            measures.predictivity(
                model if big else in_float64(),
                l,
                rho_inputs["h"][l],
                rho_inputs["a"][l],
                y,
                dirs=cfg.rho_dirs,
                eps=cfg.rho_eps,
                generator=gen,
            )
        )
    for l, v in rhos.items():
        out[f"credit/rho_l{l}"] = v
    out["credit/rho_deep"] = _mean(rhos[l] for l in deep)
    return out


def _grad_stability(model64: CreditNet, inputs: dict[str, Tensor], L: int) -> Tensor:
    layer = math.ceil(L / 2)
    x, y = inputs["x_stab"], inputs["y_stab"]
    return measures.gradient_stability(
        [true_grads(model64, x[i].double(), y[i])[1][layer] for i in range(x.shape[0])]
    )


def _mean(values) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else math.nan
