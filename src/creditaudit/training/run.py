"""One training run in memory: its data, model, rule and optimizer, one step, one epoch, its evaluation
and the state a checkpoint holds (docs/science.md §1).

Optimisation follows the study's recipe: AdamW, cosine schedule over all steps, one parameter
group — an independent optimizer state — per block, plus the embedding and the readout. AdamW's
update is elementwise, so per-block groups are exactly per-block optimizers.

Reproducibility: the model and then the rule's random state are drawn on the CPU from the run seed
alone; data order and augmentation are functions of (seed, epoch); every RNG and optimizer state is
in :func:`run_state`. A run resumed from it continues bit for bit on the same device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from creditaudit.config import TrainConfig, copy_config
from creditaudit.data import DeviceLoader, TensorDataset, load_dataset
from creditaudit.diagnostics import probe
from creditaudit.errors import ConfigError
from creditaudit.models.base import (
    CreditNet,
    Forward,
    ModelConfig,
    arch_shape,
    build_model,
    parameter_count,
)
from creditaudit.rules.base import Rule, RuleContext, build_rule
from creditaudit.training.allocator import device_memory
from creditaudit.training.objective import LocalUpdate, local_objective, parse_local_update, penalty

#: bytes of device memory each parameter takes while training, at least: its float32 value, its
#: gradient and AdamW's two moments
TRAINING_BYTES_PER_PARAMETER = 16


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device={name} but no CUDA device is visible; use device=cpu or device=auto"
        )
    return device


def check_fits(
    cfg: TrainConfig, model_cfg: ModelConfig, data: TensorDataset, device: torch.device
) -> None:
    """Refuse a model whose parameters, with their gradients and AdamW's moments, exceed the device's
    memory (``d=200000`` would ask for terabytes): counted before anything is allocated. A lower
    bound of what training takes (activations, the data and a rule's own matrices come on top), so
    it refuses no model that fits; the largest of the study's profiles needs about 130 MB."""
    n = parameter_count(cfg.arch, model_cfg, data.input_shape, data.num_classes)
    total = device_memory(device)
    if n is None or total is None or n * TRAINING_BYTES_PER_PARAMETER <= total:
        return
    shape = arch_shape(cfg.arch, model_cfg)
    raise ConfigError(
        f"{cfg.arch} with d={shape.d}, L={shape.L} has {n:,} parameters: training needs at least "
        f"{_gib(n * TRAINING_BYTES_PER_PARAMETER)} for them (values, gradients, AdamW's two moments), but the "
        f"{device.type} device has {_gib(total)}; choose a smaller d or L"
    )


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


# ---------------------------------------------------------------------------------------------
# Building a run
# ---------------------------------------------------------------------------------------------
@dataclass
class Run:
    """Everything a training run holds in memory."""

    cfg: TrainConfig
    device: torch.device
    data: TensorDataset
    model: CreditNet
    rule: Rule
    variant: str | None
    optimizer: torch.optim.Optimizer
    loader: DeviceLoader
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    wall_s: float = 0.0  # training wall time over all sessions of this run
    total_steps: int = 0
    local_rule: LocalUpdate = field(
        default_factory=lambda: LocalUpdate("inner")
    )  # parsed once from cfg.local_rule

    @property
    def train_blocks(self) -> bool:
        return self.variant != "frozen"


def build_run(
    cfg: TrainConfig, *, device: torch.device | None = None, data: TensorDataset | None = None
) -> Run:
    """Data, model, rule and optimizer for ``cfg``, fresh (epoch 0). ``data``: this dataset instead
    of ``cfg.data``'s (the benchmarks train on synthetic data of the study's shapes; a stack shares
    one copy among its runs)."""
    device = device or resolve_device(cfg.device)
    data = (data if data is not None else load_dataset(cfg.data, cfg.seed)).to(device)
    rule, variant = build_rule(cfg.rule, cfg.rule_opts)
    model_cfg = copy_config(cfg.model)
    if variant == "shallow":
        model_cfg.L = 0
    check_fits(cfg, model_cfg, data, device)
    # The model and then the rule's random state are drawn on the CPU from the run seed alone.
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, model_cfg, data.input_shape, data.num_classes)
    loader = DeviceLoader(
        data.x_train,
        data.y_train,
        cfg.batch_size,
        seed=cfg.seed,
        shuffle=True,
        augment=data.augment,
    )
    state_shapes, norm_shape = model.shapes(data.input_shape)
    ctx = RuleContext(
        device=device,
        num_classes=data.num_classes,
        steps_per_epoch=len(loader),
        total_steps=cfg.epochs * len(loader),
        seed=cfg.seed,
        state_shapes=tuple(state_shapes),
        norm_shape=norm_shape,
    )
    rule.setup(model, ctx)
    model.to(device)
    if variant == "frozen":
        for p in model.blocks.parameters():
            p.requires_grad_(False)
    groups = model.param_groups(blocks=variant != "frozen")
    o = cfg.optim
    optimizer = torch.optim.AdamW(
        groups, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay
    )
    return Run(
        cfg,
        device,
        data,
        model,
        rule,
        variant,
        optimizer,
        loader,
        total_steps=ctx.total_steps,
        local_rule=parse_local_update(cfg.local_rule),
    )


def diagnose(run: Run, *, full: bool) -> dict[str, float]:
    """The per-epoch diagnostics of docs/science.md §4 for the run's current state."""
    return probe(run.model, run.rule, run.data, run.cfg.diag, full=full, seed=run.cfg.seed)


def lr_factor(cfg: TrainConfig, step: int, total: int) -> float:
    if cfg.optim.schedule == "constant":
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


# ---------------------------------------------------------------------------------------------
# One step, one epoch
# ---------------------------------------------------------------------------------------------
@dataclass
class StepObjective:
    """A step's objective before its backward pass, and what the step reports."""

    objective: Tensor  # scalar: what the backward pass differentiates
    loss: Tensor  # scalar: the batch-mean cross-entropy
    logits: Tensor  # (B, C)
    fwd: Forward | None  # the local-update forward pass (None for end-to-end rules)
    metrics: dict[str, Tensor]  # the rule's reported metrics


def step_objective(
    model: CreditNet,
    rule: Rule,
    x: Tensor,
    y: Tensor,
    *,
    lam: float | Tensor,
    local_rule: LocalUpdate,
    train_blocks: bool,
) -> StepObjective:
    """The training objective of one step (docs/science.md §1), written for one run: a stack
    (``training/stack.py``) evaluates this same function for every run of the stack at once.

    End-to-end rules (BP): CE (+ lam·Σ_l mean_b ||f_l||², the capacity-cost control). Every other
    rule: CE of the readout plus the shared local update fed with the rule's credits. Called
    inside ``rule.local_forward(model)``; ``lam`` may be a 0-d tensor (a stack's per-run value)."""
    if rule.end_to_end:
        if isinstance(lam, Tensor) or lam:
            fwd = model.run(x)
            loss = F.cross_entropy(fwd.logits, y)
            return StepObjective(loss + penalty(fwd, lam), loss, fwd.logits, None, {})
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        return StepObjective(loss, loss, logits, None, {})
    fwd = model.run(x, detach_inputs=True)
    credits = rule.credits(model, x, y, fwd)
    loss = F.cross_entropy(fwd.logits, y)
    objective = loss + local_objective(
        fwd, credits, rule=local_rule, lam=lam, train_blocks=train_blocks
    )
    return StepObjective(objective, loss, fwd.logits, fwd, rule.reported())


def train_step(run: Run, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """One optimizer step; returns (summed loss, correct count, rule metrics), all on device."""
    model, rule, opt = run.model, run.rule, run.optimizer
    factor = lr_factor(run.cfg, run.step, run.total_steps)
    for g in opt.param_groups:
        g["lr"] = run.cfg.optim.lr * factor
    opt.zero_grad(set_to_none=True)
    with rule.local_forward(model):
        out = step_objective(
            model,
            rule,
            x,
            y,
            lam=run.cfg.lam,
            local_rule=run.local_rule,
            train_blocks=run.train_blocks,
        )
        out.objective.backward()
    opt.step()
    metrics = out.metrics
    if out.fwd is not None:  # the local-update pass ran: every rule but an end-to-end one
        metrics = {**metrics, **rule.step(model, x, y, out.fwd)}
    run.step += 1
    return out.loss.detach() * y.shape[0], (out.logits.detach().argmax(1) == y).sum(), metrics


@torch.no_grad()
def evaluate(model: CreditNet, x: Tensor, y: Tensor, batch_size: int) -> tuple[float, float]:
    """Mean CE and accuracy over (x, y), in eval mode (BatchNorm uses running statistics)."""
    was_training = model.training
    model.eval()
    loss = torch.zeros((), device=x.device, dtype=torch.float64)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for i in range(0, x.shape[0], batch_size):
        logits = model(x[i : i + batch_size])
        yb = y[i : i + batch_size]
        loss += F.cross_entropy(logits, yb, reduction="sum").double()
        correct += (logits.argmax(1) == yb).sum()
    model.train(was_training)
    n = max(x.shape[0], 1)
    return loss.item() / n, correct.item() / n


StepCallback = Callable[
    [int, int, float, float], None
]  # (step in epoch, steps per epoch, loss, acc)


def train_epoch(
    run: Run, on_step: StepCallback | None = None, report_every: int = 25
) -> dict[str, float]:
    """One pass over the training set; metrics are synchronised with the device once per epoch
    (and every ``report_every`` steps when a progress callback wants live figures)."""
    run.model.train()
    loss_sum = torch.zeros((), device=run.device)
    correct = torch.zeros((), device=run.device, dtype=torch.long)
    seen = 0
    rule_sums: dict[str, Tensor] = {}
    n_steps = len(run.loader)
    for i, (x, y) in enumerate(run.loader.epoch(run.epoch)):
        l, c, rm = train_step(run, x, y)
        loss_sum += l
        correct += c
        seen += y.shape[0]
        for k, v in rm.items():
            rule_sums[k] = rule_sums.get(k, 0.0) + v.detach()
        if on_step is not None and ((i + 1) % report_every == 0 or i + 1 == n_steps):
            on_step(i + 1, n_steps, loss_sum.item() / seen, correct.item() / seen)
    out = {"train/loss": loss_sum.item() / max(seen, 1), "train/acc": correct.item() / max(seen, 1)}
    out.update({f"rule/{k}": float(v) / n_steps for k, v in rule_sums.items()})
    return out


# ---------------------------------------------------------------------------------------------
# Checkpoint state
# ---------------------------------------------------------------------------------------------
def run_state(run: Run) -> dict[str, Any]:
    state = {
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "rule": run.rule.state_dict(),
        "rng_cpu": torch.get_rng_state(),
    }
    if run.device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(run.device)
    return state


def run_meta(run: Run) -> dict[str, Any]:
    return {"epoch": run.epoch, "step": run.step, "wall_s": run.wall_s}


def restore(run: Run, state: dict[str, Any], meta: dict[str, Any]) -> None:
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.rule.load_state_dict(state.get("rule", {}))
    torch.set_rng_state(state["rng_cpu"].cpu())
    if "rng_cuda" in state and run.device.type == "cuda":
        torch.cuda.set_rng_state(state["rng_cuda"].cpu(), run.device)
    run.epoch, run.step, run.wall_s = int(meta["epoch"]), int(meta["step"]), float(meta["wall_s"])
