"""The training loop: one run of one rule, into its own run folder (docs/science.md §1 and docs/science.md §6).

``train(cfg)`` owns the run folder: it skips a finished run, resumes a killed one from its last
checkpoint (bit-identical to an uninterrupted run on the same device: data order and augmentation
are functions of (seed, epoch), and every RNG and optimizer state is checkpointed), records a
diverged or crashed run with its status, and appends one JSON line of metrics per epoch.

Optimisation follows the study's recipe: AdamW, cosine schedule over all steps, one parameter
group — an independent optimizer state — per block, plus the embedding and the readout. AdamW's
update is elementwise, so per-block groups are exactly per-block optimizers.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from torch.nn import functional as F

from creditaudit import config as C
from creditaudit import trackers
from creditaudit import typedconfig as T
from creditaudit.config import TrainConfig
from creditaudit.data import DeviceLoader, TensorDataset, load_dataset
from creditaudit.diagnostics import due, probe
from creditaudit.models.base import CreditNet, build_model
from creditaudit.rules.base import Rule, RuleContext, build_rule
from creditaudit.runs.checkpoint import load_checkpoint, save_checkpoint
from creditaudit.runs.folder import RunFolder
from creditaudit.runs.provenance import provenance
from creditaudit.train.allocator import keep_freed_memory
from creditaudit.train.objective import LocalUpdate, local_objective, parse_local_update, penalty

class RunConfigMismatch(RuntimeError):
    """The run folder already holds a run with a different configuration."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise C.ConfigError(f"device={name} but no CUDA device is visible; use device=cpu or device=auto")
    return device


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
    local_rule: LocalUpdate = LocalUpdate("inner")  # parsed once from cfg.local_rule

    @property
    def train_blocks(self) -> bool:
        return self.variant != "frozen"


def build_run(cfg: TrainConfig, *, rule: Rule | None = None, device: torch.device | None = None,
              data: TensorDataset | None = None) -> Run:
    """Data, model, rule and optimizer for ``cfg``, fresh (epoch 0). ``data``: this dataset instead
    of ``cfg.data``'s (the benchmarks train on synthetic data of the study's shapes)."""
    device = device or resolve_device(cfg.device)
    data = (data if data is not None else load_dataset(cfg.data, cfg.seed)).to(device)
    built_rule, variant = build_rule(cfg.rule, cfg.rule_opts)
    rule = rule or built_rule
    model_cfg = C.copy_config(cfg.model)
    if variant == "shallow":
        model_cfg.L = 0
    # The model and then the rule's random state are drawn on the CPU from the run seed alone.
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.arch, model_cfg, data.input_shape, data.num_classes)
    loader = DeviceLoader(data.x_train, data.y_train, cfg.batch_size, seed=cfg.seed, shuffle=True, augment=data.augment)
    state_shapes, norm_shape = model.shapes(data.input_shape)
    ctx = RuleContext(device=device, num_classes=data.num_classes, steps_per_epoch=len(loader),
                      total_steps=cfg.epochs * len(loader), seed=cfg.seed,
                      state_shapes=tuple(state_shapes), norm_shape=norm_shape)
    rule.setup(model, ctx)
    model.to(device)
    if variant == "frozen":
        for p in model.blocks.parameters():
            p.requires_grad_(False)
    groups = model.param_groups(blocks=variant != "frozen")
    o = cfg.optim
    optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
    run = Run(cfg, device, data, model, rule, variant, optimizer, loader,
              total_steps=ctx.total_steps, local_rule=parse_local_update(cfg.local_rule))
    return run


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
def train_step(run: Run, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """One optimizer step; returns (summed loss, correct count, rule metrics), all on device."""
    model, rule, opt = run.model, run.rule, run.optimizer
    factor = lr_factor(run.cfg, run.step, run.total_steps)
    for g in opt.param_groups:
        g["lr"] = run.cfg.optim.lr * factor
    opt.zero_grad(set_to_none=True)
    rule_metrics: dict[str, Tensor] = {}
    if rule.end_to_end:
        if run.cfg.lam:  # autograd of CE + lam·Σ_l mean_b ||f_l||² (the capacity-cost control)
            fwd = model.run(x)
            logits = fwd.logits
            loss = F.cross_entropy(logits, y)
            (loss + penalty(fwd, run.cfg.lam)).backward()
        else:
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
        opt.step()
    else:
        with rule.local_forward(model):
            fwd = model.run(x, detach_inputs=True)
            credits = rule.credits(model, x, y, fwd)
            loss = F.cross_entropy(fwd.logits, y)
            objective = loss + local_objective(
                fwd, credits, rule=run.local_rule, lam=run.cfg.lam, train_blocks=run.train_blocks
            )
            objective.backward()
        opt.step()
        rule_metrics = rule.step(model, x, y, fwd)
        logits = fwd.logits
    run.step += 1
    return loss.detach() * y.shape[0], (logits.detach().argmax(1) == y).sum(), rule_metrics


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


StepCallback = Callable[[int, int, float, float], None]  # (step in epoch, steps per epoch, loss, acc)


def train_epoch(run: Run, on_step: StepCallback | None = None, report_every: int = 25) -> dict[str, float]:
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
# Checkpoints
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


def _same_config(folder: RunFolder, cfg: TrainConfig) -> bool:
    """True when the folder holds no config or the same one; raise when it holds another run."""
    existing = folder.read_config()
    if existing is None:
        return True
    diff = T.diff(T.semantic_dict(C.from_dict(existing)), T.semantic_dict(cfg))  # fields marked semantic=False may differ
    if diff:
        raise RunConfigMismatch(
            f"{folder.path} already holds a run with a different config ({'; '.join(diff)}). "
            "Use another setting=NAME or results=DIR, or delete that folder to train it again."
        )
    return True


# ---------------------------------------------------------------------------------------------
# A whole run in its folder
# ---------------------------------------------------------------------------------------------
EpochHook = Callable[[Run], dict[str, float]]  # extra per-epoch metrics (diagnostics plug in here)


@dataclass
class Reporter:
    """What the trainer tells the outside world (the CLI shows a progress bar from it)."""

    on_start: Callable[[Run, str], None] = lambda run, how: None
    on_step: StepCallback | None = None
    on_epoch: Callable[[Run, dict], None] = lambda run, record: None


def train(
    cfg: TrainConfig,
    *,
    rule: Rule | None = None,
    hooks: list[EpochHook] = (),  # type: ignore[assignment]
    reporter: Reporter | None = None,
    stop_after: int | None = None,
) -> dict:
    """Train (or resume, or skip) the run ``cfg`` names; return its summary.

    ``stop_after`` ends the session after that many epochs in total, leaving the run resumable
    with status ``interrupted`` (used by tests and by time-boxed workers).
    """
    C.load_plugins(cfg)  # a worker process rebuilding the config registers its rule files
    C.validate(cfg)
    cfg = C.resolve_rule_options(cfg)  # the run folder records every option of the rule
    reporter = reporter or Reporter()
    folder = RunFolder(C.run_path(cfg))
    if folder.summary_path.exists() and folder.status() == "finished" and _same_config(folder, cfg):
        reporter.on_start(None, "skipped")  # type: ignore[arg-type]
        return folder.read_summary()
    # Data, model and rule first: a config that cannot run fails here, before any file is written.
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    keep_freed_memory()  # large CPU tensors reuse freed pages (train/allocator.py)
    run = build_run(cfg, rule=rule)
    folder.path.mkdir(parents=True, exist_ok=True)
    with folder.lock():
        _same_config(folder, cfg)  # raises when the folder holds another run
        summary = folder.read_summary()
        if summary is not None and summary.get("status") == "finished":  # finished meanwhile
            reporter.on_start(None, "skipped")  # type: ignore[arg-type]
            return summary
        resumed_from = None
        if folder.last_checkpoint.exists():
            state, meta = load_checkpoint(folder.last_checkpoint, device=run.device)
            restore(run, state, meta)
            resumed_from = run.epoch
            # Drop metric lines written after the checkpoint (they are recomputed identically).
            folder.rewrite_metrics([r for r in folder.read_metrics() if r["epoch"] <= run.epoch])
        else:
            folder.rewrite_metrics([])
        folder.write_config(C.to_dict(cfg))
        base = {
            "run": folder.path.name,
            "setting": cfg.setting,
            "rule": cfg.rule,
            "arch": cfg.arch,
            "dataset": cfg.data.dataset,
            "seed": cfg.seed,
            "epochs": cfg.epochs,
            "device": str(run.device),
            "provenance": provenance(run.device),
            "resumed_from": resumed_from,
            "started": (summary or {}).get("started") or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        # logger=tensorboard|mlflow: a view of the folder's metrics; it never raises (a failure is one line on stderr)
        tracker = trackers.start(cfg, folder.path, resumed_from=resumed_from, records=folder.read_metrics())

        def write_summary(status: str, **extra: Any) -> dict:
            records = folder.read_metrics()
            s = {**base, "status": status, "epochs_done": run.epoch, "wall_s": round(run.wall_s, 3),
                 "final": records[-1] if records else None, **extra}
            folder.write_summary(s)
            if status != "running":
                tracker.finish(status)
            return s

        write_summary("running")
        reporter.on_start(run, "resumed" if resumed_from else "started")
        try:  # from here on, a crash is recorded in the summary (the sweep goes on with other runs)
            if run.epoch == 0 and due(cfg.diag, 0, cfg.epochs)[0]:
                t0 = time.perf_counter()
                record0 = {"epoch": 0, **diagnose(run, full=due(cfg.diag, 0, cfg.epochs)[1])}
                record0["time/diag_s"] = time.perf_counter() - t0
                folder.append_metrics(record0)
                tracker.log(record0, step=0)
            while run.epoch < cfg.epochs:
                if stop_after is not None and run.epoch >= stop_after:
                    return write_summary("interrupted")
                t0 = time.perf_counter()
                record: dict[str, Any] = {"epoch": run.epoch + 1}
                record.update(train_epoch(run, reporter.on_step))
                t_train = time.perf_counter() - t0
                run.epoch += 1
                record["test/loss"], record["test/acc"] = evaluate(run.model, run.data.x_test, run.data.y_test, cfg.eval_batch_size)
                record["lr"] = cfg.optim.lr * lr_factor(cfg, run.step, run.total_steps)
                record["time/train_s"] = t_train
                wanted, full = due(cfg.diag, run.epoch, cfg.epochs)
                if wanted and math.isfinite(record["train/loss"]):
                    t1 = time.perf_counter()
                    record.update(diagnose(run, full=full))
                    record["time/diag_s"] = time.perf_counter() - t1
                for hook in hooks:
                    record.update(hook(run))
                record["time/epoch_s"] = time.perf_counter() - t0
                run.wall_s += record["time/epoch_s"]
                folder.append_metrics(record)
                tracker.log(record, step=run.epoch)
                reporter.on_epoch(run, record)
                if not math.isfinite(record["train/loss"]):
                    return write_summary("diverged", error=f"training loss became {record['train/loss']} in epoch {run.epoch}")
                save_checkpoint(folder.last_checkpoint, run_state(run), run_meta(run))
                if run.epoch in cfg.save_epochs:
                    save_checkpoint(folder.epoch_checkpoint(run.epoch), {"model": run.model.state_dict(), "rule": run.rule.state_dict()}, run_meta(run))
        except KeyboardInterrupt:
            write_summary("interrupted")
            raise
        except Exception as exc:
            write_summary("failed", error=f"{type(exc).__name__}: {exc}")
            raise
        return write_summary("finished")
