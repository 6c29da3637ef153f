"""Several runs of one kind trained as one program, with a leading run axis (docs/performance.md).

A study trains many tiny networks: on a GPU one run per process leaves most of the card idle, a step
being a few hundred small kernels. Runs of one *kind* — the same rule, architecture, sizes, batch,
data and schedule — differ only in numbers (seed, penalty λ, random labels), so they can share
every kernel: each parameter, buffer, optimizer state and fixed rule tensor of the R runs is
stacked on a new leading axis, and one step

1. evaluates :func:`creditaudit.training.run.step_objective` — the same function, written for one run,
   that a run alone calls — under ``torch.func.vmap`` over that axis, with the template model and
   rule reparametrised by each run's tensors (the rule's code never sees the run axis);
2. sums the R objectives and backpropagates once: the runs share no parameter, so each run's
   gradient is exactly its own;
3. steps one AdamW over the stacked parameters: its update is elementwise, so this is each run's
   AdamW, with its own moments, weight decay and (shared) learning-rate schedule.

Nothing leaks between runs: BatchNorm statistics, LayerNorm and every reduction inside the rule and
the objective are per run under vmap; each run's batches come from its own order and augmentation
draws (``data.loader.stacked_epoch``); a run that diverges stops (its folder says so) while the
others go on. Each run keeps its folder, config, metrics, checkpoints, lock, resume and
diagnostics: the stack writes its tensors back into each run (:meth:`Stack.unstack`) before the
run's :class:`~creditaudit.training.trainer.RunSession` closes the epoch, so a checkpoint written in a
stack resumes alone and the reverse. Evaluation and the per-epoch probe run on the batched path too:
:meth:`Stack.evaluate`, and :meth:`Stack.probe` — the probe's shared part
(``diagnostics.probe.shared_figures``) under ``vmap``, then each run's ρ_l on its own model
(:func:`diagnose`). A run trained in a stack gives the metrics it gives alone, to
float rounding (batched matrix products round differently): ``tests/test_stack.py``.

On CUDA, ``graph=True`` captures a step of each batch shape in a CUDA graph after two eager steps
(the full batches and the last, partial one each get theirs) and replays it: one launch per step
instead of hundreds. The optimizer is then capturable with its learning rate a device tensor, and
the step's metrics stay on the device until the epoch ends.

Which runs stack: :func:`why_not_stacked` (a rule declares it, ``rules/base.py``), and runs of one
kind share a :func:`stack_key`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils import _pytree as pytree

from creditaudit.config import TrainConfig, to_dict
from creditaudit.data import TensorDataset, load_dataset
from creditaudit.data.loader import stacked_epoch
from creditaudit.diagnostics import due
from creditaudit.diagnostics.probe import (
    DiagConfig,
    Sizes,
    finish,
    probe_inputs,
    probing,
    shared_figures,
)
from creditaudit.rules.base import RULES, Rule, parse_rule_name
from creditaudit.runs.folder import RunLockedError
from creditaudit.training.allocator import available_memory
from creditaudit.training.run import (
    Run,
    build_run,
    lr_factor,
    resolve_device,
    step_objective,
)
from creditaudit.training.trainer import (
    Reporter,
    RunSession,
    open_session,
    prepare,
    set_up_process,
)

#: eager steps of a batch shape before its step is captured in a CUDA graph (graph=True)
GRAPH_WARMUP = 2
#: activation memory of a step, in multiples of the batch's states h_0..h_L (forward values, their
#: gradients, the local pass and the rule's own work; EP's relaxation keeps a few more): an upper
#: estimate, so that a stack sized by it fits
ACTIVATION_FACTOR = 24
#: memory of a probe's shared part, in multiples of its reference batch's states in float64 (states,
#: reference gradients, credits, and the float64 pass that gives the gradients)
PROBE_FACTOR = 16


# ---------------------------------------------------------------------------------------------
# Which runs stack, and with which
# ---------------------------------------------------------------------------------------------
def why_not_stacked(cfg: TrainConfig) -> str | None:
    """Why runs of ``cfg``'s rule cannot train in a stack (one line), or None when they can."""
    cls = RULES.get(parse_rule_name(cfg.rule)[0])
    if cls.stack_refusal:
        return f"{cfg.rule}: {cls.stack_refusal}"
    if cls.step is not Rule.step:
        return f"{cfg.rule}: trains something of its own in step()"
    return None


def stack_key(cfg: TrainConfig) -> str:
    """Runs whose keys are equal can train in one stack: everything that shapes a step is equal —
    rule and its options, architecture and sizes, batch, data, epochs and schedule, device — and
    only numbers differ: seed, λ (when both are non-zero), random labels, and what is per run
    anyway (folder, diagnostics, checkpoints kept)."""
    d = to_dict(cfg)
    for per_run in (
        "seed",
        "setting",
        "results",
        "arch_label",
        "save_epochs",
        "progress",
        "logger",
        "logger_dir",
        "threads",
        "eval_batch_size",
        "diag",
    ):
        d.pop(per_run, None)
    d["lam"] = bool(d["lam"])  # the penalty term exists or not; its weight is a number
    d["data"].pop("random_labels", None)
    return json.dumps(d, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# The stack
# ---------------------------------------------------------------------------------------------
@dataclass
class _Graph:
    graph: Any  # torch.cuda.CUDAGraph
    x: Tensor  # static inputs, (R, B, ...) and (R, B)
    y: Tensor


class Stack:
    """R runs of one kind (fresh, or resumed at the same step) as one model with a run axis."""

    def __init__(self, runs: list[Run], *, graph: bool = False):
        if len({(r.epoch, r.step) for r in runs}) != 1:
            raise ValueError("runs of a stack must be at the same epoch and step")
        self.runs = runs
        first = runs[0]
        self.cfg, self.device = first.cfg, first.device
        self.graphed = graph and self.device.type == "cuda"
        # The template: its own tensors are never read (every call reparametrises it).
        self.model = copy.deepcopy(first.model)
        self.rule = copy.deepcopy(first.rule)
        self.step_count, self.total_steps = first.step, first.total_steps

        params = [dict(r.model.named_parameters()) for r in runs]
        buffers = [dict(r.model.named_buffers()) for r in runs]
        self.params = {
            n: torch.stack([own[n].detach() for own in params]).requires_grad_(p.requires_grad)
            for n, p in params[0].items()
        }
        self.buffers = {n: torch.stack([own[n] for own in buffers]) for n in buffers[0]}
        self.optimizer = self._optimizer()

        # The rule's fixed tensors (its state_dict's tensor leaves), stacked; the rest is run 0's.
        flat = [pytree.tree_flatten(r.rule.state_dict()) for r in runs]
        self.rule_spec = flat[0][1]
        if any(spec != self.rule_spec for _, spec in flat):
            raise ValueError(
                f"{self.cfg.rule}: the rule's state differs in structure between the runs of a stack"
            )
        self.rule_leaves = flat[0][0]
        self.rule_tensors = [
            torch.stack([leaves[i] for leaves, _ in flat])
            for i, v in enumerate(self.rule_leaves)
            if isinstance(v, Tensor)
        ]

        lams = [r.cfg.lam for r in runs]
        self.lam = (
            torch.tensor(lams, device=self.device) if any(lams) else None
        )  # (R,), a number per run
        self._graphs: dict[tuple[int, ...], _Graph] = {}
        self._seen: dict[tuple[int, ...], int] = {}
        self._sums: dict[str, Tensor] = {}  # per-run metric sums of the epoch, (R,) each, on device

    def __len__(self) -> int:
        return len(self.runs)

    # ---- building ---------------------------------------------------------------------------
    def _optimizer(self) -> torch.optim.Optimizer:
        """One AdamW over the stacked parameters, with the runs' parameter groups and options;
        moments stacked from the runs' own when they resume."""
        first = self.runs[0]
        name_of = {id(p): n for n, p in first.model.named_parameters()}
        groups = []
        for g in first.optimizer.param_groups:
            options = {k: v for k, v in g.items() if k != "params"}
            if self.graphed:
                options.update(
                    capturable=True,
                    foreach=True,
                    lr=torch.tensor(float(g["lr"]), device=self.device),
                )
            groups.append({**options, "params": [self.params[name_of[id(p)]] for p in g["params"]]})
        opt = torch.optim.AdamW(groups)
        per_run = [[p for g in r.optimizer.param_groups for p in g["params"]] for r in self.runs]
        for i, stacked in enumerate(p for g in opt.param_groups for p in g["params"]):
            states: list[dict[str, Any]] = [
                r.optimizer.state.get(params[i], {})
                for r, params in zip(self.runs, per_run, strict=True)
            ]
            if not any(states):
                continue
            step = states[0]["step"]
            opt.state[stacked] = {
                "step": step.to(self.device) if self.graphed else step.clone(),
                **{k: torch.stack([s[k] for s in states]) for k in states[0] if k != "step"},
            }
        return opt

    def unstack(self) -> None:
        """Write every run's slice back into its own model, optimizer state and step count: each
        run is then what it would be alone (its checkpoint, probes and evaluation read it)."""
        stacked = [p for g in self.optimizer.param_groups for p in g["params"]]
        with torch.no_grad():
            for r, run in enumerate(self.runs):
                for n, p in run.model.named_parameters():
                    p.copy_(self.params[n][r])
                for n, b in run.model.named_buffers():
                    b.copy_(self.buffers[n][r])
                own = [p for g in run.optimizer.param_groups for p in g["params"]]
                for p, s in zip(own, stacked, strict=True):
                    state = self.optimizer.state.get(s)
                    if state:
                        run.optimizer.state[p] = {
                            "step": state["step"].detach().to("cpu", torch.float32).clone(),
                            **{k: v[r].clone() for k, v in state.items() if k != "step"},
                        }
                run.step = self.step_count

    # ---- one step ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _bound(
        self, params: dict[str, Tensor], buffers: dict[str, Tensor], rule_tensors: list[Tensor]
    ) -> Iterator[None]:
        """The template model and rule as one run: its parameters, buffers and rule tensors."""
        tensors = iter(rule_tensors)
        leaves = [next(tensors) if isinstance(v, Tensor) else v for v in self.rule_leaves]
        self.rule.load_state_dict(pytree.tree_unflatten(leaves, self.rule_spec))
        with _reparametrize_module(self.model, {**params, **buffers}):
            yield

    def _one_run(self, params, buffers, rule_tensors, x, y, lam):
        """One run's step objective and figures (called under vmap: every tensor is one run's)."""
        with self._bound(params, buffers, rule_tensors), self.rule.local_forward(self.model):
            out = step_objective(
                self.model,
                self.rule,
                x,
                y,
                lam=0.0 if lam is None else lam,
                local_rule=self.runs[0].local_rule,
                train_blocks=self.runs[0].train_blocks,
            )
        logits = out.logits.detach()
        return out.objective, {
            "loss_sum": out.loss.detach() * y.shape[0],
            "correct": (logits.argmax(1) == y).sum(),
            **{f"rule/{k}": v.detach() for k, v in out.metrics.items()},
        }

    def _step(self, x: Tensor, y: Tensor) -> None:
        """Forward, backward and optimizer step of all runs; figures added to the epoch's sums."""
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(x, y)
        self.optimizer.step()

    def backward(self, x: Tensor, y: Tensor) -> None:
        """Every run's gradients for this batch (accumulated into ``.grad``) and its figures added
        to the epoch's sums; nothing here reads a value back to the host."""
        lam_dim = None if self.lam is None else 0
        with _batchable_kernels():
            objectives, figures = vmap(
                self._one_run, in_dims=(0, 0, 0, 0, 0, lam_dim), randomness="error"
            )(self.params, self.buffers, self.rule_tensors, x, y, self.lam)
        objectives.sum().backward()
        for k, v in figures.items():
            if k in self._sums:
                self._sums[k] += v
            else:
                self._sums[k] = v.clone()

    def _set_lr(self) -> None:
        lr = self.cfg.optim.lr * lr_factor(self.cfg, self.step_count, self.total_steps)
        for g in self.optimizer.param_groups:
            if isinstance(g["lr"], Tensor):
                g["lr"].fill_(lr)
            else:
                g["lr"] = lr

    def train_step(self, x: Tensor, y: Tensor) -> None:
        """One step of every run on its batch: x (R, B, ...), y (R, B)."""
        self._set_lr()
        if not self.graphed:
            self._step(x, y)
        else:
            self._graphed_step(x, y)
        self.step_count += 1

    def _graphed_step(self, x: Tensor, y: Tensor) -> None:
        key = tuple(x.shape)
        g = self._graphs.get(key)
        if g is not None:
            g.x.copy_(x)
            g.y.copy_(y)
            g.graph.replay()
            return
        self._seen[key] = self._seen.get(key, 0) + 1
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            if (
                self._seen[key] <= GRAPH_WARMUP
            ):  # real steps, eager: lazy initialisation happens here
                self._step(x, y)
            else:
                g = _Graph(torch.cuda.CUDAGraph(), x.clone(), y.clone())
                self.optimizer.zero_grad(set_to_none=True)  # the graph allocates its gradients
                with torch.cuda.graph(g.graph, stream=side):
                    self._step(g.x, g.y)
                self._graphs[key] = g
        torch.cuda.current_stream(self.device).wait_stream(side)
        if g is not None:
            g.graph.replay()  # capturing did not run the step

    # ---- one epoch --------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> list[dict[str, float]]:
        """One pass of every run over its training set; each run's epoch figures. The figures
        stay on the device until the epoch ends (one synchronisation)."""
        self.model.train()
        for v in self._sums.values():
            v.zero_()
        n_steps, seen = 0, 0
        for x, y in stacked_epoch([r.loader for r in self.runs], epoch):
            self.train_step(x, y)
            n_steps += 1
            seen += y.shape[1]
        sums = {k: v.double().cpu().tolist() for k, v in self._sums.items()}
        return [
            {
                "train/loss": sums["loss_sum"][r] / max(seen, 1),
                "train/acc": sums["correct"][r] / max(seen, 1),
                **{k: v[r] / n_steps for k, v in sums.items() if k.startswith("rule/")},
            }
            for r in range(len(self))
        ]

    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor, batch_size: int) -> list[tuple[float, float]]:
        """Every run's mean CE and accuracy on (x, y), shared test data, in eval mode: the run
        axis over :func:`~creditaudit.training.run.evaluate`'s computation."""
        self.model.eval()

        def one(params, buffers, xb, yb):
            with _reparametrize_module(self.model, {**params, **buffers}):
                logits = self.model(xb)
            return F.cross_entropy(logits, yb, reduction="sum").double(), (
                logits.argmax(1) == yb
            ).sum()

        loss = torch.zeros(len(self), device=x.device, dtype=torch.float64)
        correct = torch.zeros(len(self), device=x.device, dtype=torch.long)
        for i in range(0, x.shape[0], batch_size):
            with _batchable_kernels():
                l, c = vmap(one, in_dims=(0, 0, None, None))(
                    self.params, self.buffers, x[i : i + batch_size], y[i : i + batch_size]
                )
            loss += l
            correct += c
        self.model.train()
        n = max(x.shape[0], 1)
        return [(lo / n, co / n) for lo, co in zip(loss.tolist(), correct.tolist(), strict=True)]

    # ---- the diagnostics ---------------------------------------------------------------------
    def probe(
        self, members: list[int], cfg: DiagConfig, *, full: bool
    ) -> list[tuple[dict[str, Tensor], dict]]:
        """The shared part of the per-epoch probe (:func:`~creditaudit.diagnostics.probe.shared_figures`)
        of the runs ``members`` (positions in the stack; one :class:`DiagConfig`), under ``vmap``:
        each member's figures and what its ρ_l reads. Taken from the stack's tensors (no need to
        :meth:`unstack` first), in as many chunks of runs as the device's memory needs."""
        runs = [self.runs[i] for i in members]
        sizes = Sizes.of(runs[0].data, cfg, full=full)
        shared = all(r.data is runs[0].data for r in runs)
        inputs = (
            probe_inputs(runs[0].data, cfg, sizes)
            if shared
            else _stacked([probe_inputs(r.data, cfg, sizes) for r in runs])
        )
        at = torch.tensor(members, device=self.device)
        params = {n: p.detach()[at] for n, p in self.params.items()}
        buffers = {n: b[at] for n, b in self.buffers.items()}
        rule_tensors = [t[at] for t in self.rule_tensors]
        model64 = copy.deepcopy(self.model).double()

        def one(params, buffers, rule_tensors, inputs):
            in64 = {
                n: t.double() if t.is_floating_point() else t
                for n, t in {**params, **buffers}.items()
            }
            with self._bound(params, buffers, rule_tensors), _reparametrize_module(model64, in64):
                return shared_figures(self.model, model64, self.rule, inputs, cfg, sizes)

        chunk = probe_chunk(runs[0], sizes)
        self.model.eval()
        model64.eval()
        try:
            with _batchable_kernels():
                figures, rho = vmap(
                    one,
                    in_dims=(0, 0, 0, None if shared else 0),
                    randomness="error",
                    chunk_size=min(chunk, len(runs)),
                )(params, buffers, rule_tensors, inputs)
        finally:
            self.model.train()
        return [
            ({k: v[r] for k, v in figures.items()}, pytree.tree_map(lambda t, r=r: t[r], rho))
            for r in range(len(runs))
        ]


def _stacked(dicts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.stack([d[k] for d in dicts]) for k in dicts[0]}


def probe_chunk(run: Run, sizes: Sizes) -> int:
    """How many runs' probes (:meth:`Stack.probe`) fit in the device's memory at once: half of the
    free memory over an upper estimate of one run's (:data:`PROBE_FACTOR`), at least 1."""
    shapes, _ = run.model.shapes(run.data.input_shape)
    per_run = max(sizes.n, sizes.m) * sum(math.prod(s) for s in shapes) * 8 * PROBE_FACTOR
    per_run += 2 * sum(p.numel() for p in run.model.parameters()) * 8
    free = (
        torch.cuda.mem_get_info(run.device)[0] if run.device.type == "cuda" else available_memory()
    )
    return max(1, int(free // 2 // per_run)) if free is not None else 1 << 30


def diagnose(
    stack: Stack, sessions: list[RunSession], members: list[int], epoch: int, per_run
) -> dict[int, dict[str, float]]:
    """The probes due at ``epoch`` of the runs ``members`` (positions in the stack), taken together:
    the shared part for runs of one diagnostics config at once (:meth:`Stack.probe`), then each
    run's ρ_l from its own model (:func:`~creditaudit.diagnostics.probe.finish`; the stack must be
    unstacked). ``per_run(i, fn, ...)`` runs a member's own work (a failure fails that run only).
    Each member's figures carry its ``time/diag_s``: its part of the shared time, and its own."""
    groups: dict[tuple[str, bool], list[int]] = {}
    for i in members:
        cfg = sessions[i].run.cfg
        wanted, full = due(cfg.diag, epoch, cfg.epochs)
        if wanted:
            key = (json.dumps(to_dict(cfg)["diag"], sort_keys=True), full)
            groups.setdefault(key, []).append(i)
    out: dict[int, dict[str, float]] = {}
    for (_, full), group in groups.items():
        t0 = time.perf_counter()
        diag_cfg = sessions[group[0]].run.cfg.diag
        shared = stack.probe(group, diag_cfg, full=full)
        share = (time.perf_counter() - t0) / len(group)
        for i, (figures, rho) in zip(group, shared, strict=True):
            run = sessions[i].run

            def own(
                run=run, figures=figures, rho=rho, diag_cfg=diag_cfg, full=full, share=share
            ) -> dict[str, float]:
                t1 = time.perf_counter()
                got = finish_probe(run, figures, rho, diag_cfg, full=full)
                return {**got, "time/diag_s": share + time.perf_counter() - t1}

            got = per_run(i, own)
            if got is not None:
                out[i] = got
    return out


def finish_probe(
    run: Run, figures: dict[str, Tensor], rho: dict, cfg: DiagConfig, *, full: bool
) -> dict[str, float]:
    """One run's part of a stacked probe (:meth:`Stack.probe` gave ``figures`` and ``rho``): the
    figures read back and its ρ_l measured on its own model (the stack unstacked)."""
    with probing(run.model):
        m = Sizes.of(run.data, cfg, full=full).m
        return finish(
            figures,
            rho,
            run.model,
            lambda: copy.deepcopy(run.model).double(),
            run.data.y_test[:m],
            cfg,
            seed=run.cfg.seed,
        )


def _batchable_kernels() -> contextlib.AbstractContextManager:
    """Attention as its plain matrix products (the fused kernels have no run-axis rule in vmap,
    which would loop over the runs one by one)."""
    return sdpa_kernel([SDPBackend.MATH])


# ---------------------------------------------------------------------------------------------
# Training a stack of runs in their folders
# ---------------------------------------------------------------------------------------------
@dataclass
class StackResult:
    """What became of one run of a stack."""

    cfg: TrainConfig
    status: str  # a run status (runs/folder.py), or "locked" when another process holds it
    summary: dict | None = None
    error: str | None = None


class _SharedData:
    """Builds the runs of a stack with one copy of their data on the device: runs whose datasets are
    equal share the tensors (a stack's runs differ in seed, which the data depends on only through
    random labels)."""

    def __init__(self) -> None:
        self.datasets: list[TensorDataset] = []

    def build(self, cfg: TrainConfig) -> Run:
        data = load_dataset(cfg.data, cfg.seed)
        for known in self.datasets:
            if _same_data(known, data):
                data = known
                break
        else:
            data = data.to(resolve_device(cfg.device))
            self.datasets.append(data)
        return build_run(cfg, data=data)


def _same_data(a: TensorDataset, b: TensorDataset) -> bool:
    return (
        a.name == b.name
        and a.augment == b.augment
        and a.x_train.shape == b.x_train.shape
        and torch.equal(a.y_train.cpu(), b.y_train.cpu())
        and torch.equal(a.x_train.cpu(), b.x_train.cpu())
        and torch.equal(a.x_test.cpu(), b.x_test.cpu())
        and torch.equal(a.y_test.cpu(), b.y_test.cpu())
    )


def run_bytes(run: Run) -> int:
    """An upper estimate of the device memory one run adds to a stack: its parameters four times
    (value, gradient, two AdamW moments), its buffers, and a step's activations (ACTIVATION_FACTOR
    × the states of a batch, or of an evaluation batch, whichever is larger)."""
    params = sum(p.numel() * p.element_size() for p in run.model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in run.model.buffers())
    shapes, _ = run.model.shapes(run.data.input_shape)
    per_example = sum(math.prod(s) for s in shapes) * 4
    batch = max(run.cfg.batch_size * ACTIVATION_FACTOR, run.cfg.eval_batch_size * 2)
    return 4 * params + buffers + batch * per_example


def max_stack(runs: list[Run]) -> int:
    """How many of these runs fit in one stack: half of the device's free memory (CUDA) or of the
    available memory (CPU) over :func:`run_bytes`, at least 1."""
    device = runs[0].device
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_memory()
    if free is None:
        return len(runs)
    return max(1, int(free // 2 // max(run_bytes(runs[0]), 1)))


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    return torch.get_rng_state(), (
        torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    )


def _set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def train_stack(
    cfgs: list[TrainConfig], *, stop_after: int | None = None, graph: bool = False
) -> list[StackResult]:
    """Train (or resume, or skip) the runs ``cfgs`` name as stacks: one result per config, in order.

    Every config must share one :func:`stack_key` and stack (:func:`why_not_stacked`). Finished
    runs are skipped, runs another process holds are ``locked``, and the others are opened like a
    run alone (locked, resumed from their checkpoints); runs at the same step train as one stack
    (resumed runs at different epochs form stacks of their own, one after another). A failure of
    one run's own work (its diagnostics, its files) fails that run only; a failure of the shared
    step fails every run of its stack. Runs beyond what the device's memory holds
    (:func:`max_stack`) train as a next stack."""
    cfgs = [prepare(c) for c in cfgs]
    keys = {stack_key(c) for c in cfgs}
    if len(keys) > 1:
        raise ValueError(
            "train_stack: the configs are not of one kind (they differ in more than seed and λ)"
        )
    for c in cfgs:
        reason = why_not_stacked(c)
        if reason:
            raise ValueError(f"train_stack: {reason}")
    set_up_process(cfgs[0])
    results: list[StackResult | None] = [None] * len(cfgs)
    with contextlib.ExitStack() as held:
        sessions, rng = _open_sessions(cfgs, held, results)
        by_step: dict[tuple[int, int], list[int]] = {}
        for i, s in sessions.items():
            by_step.setdefault((s.run.epoch, s.run.step), []).append(i)
        for same_step in by_step.values():
            size = max_stack(
                [sessions[i].run for i in same_step]
            )  # what does not fit: the next stack
            for members in (same_step[k : k + size] for k in range(0, len(same_step), size)):
                for i, summary in _train_members(
                    [sessions[i] for i in members],
                    [rng[i] for i in members],
                    stop_after=stop_after,
                    graph=graph,
                ).items():
                    results[members[i]] = StackResult(
                        cfgs[members[i]], summary["status"], summary, summary.get("error")
                    )
    return results  # type: ignore[return-value]


def _open_sessions(
    cfgs: list[TrainConfig], held: contextlib.ExitStack, results: list[StackResult | None]
) -> tuple[dict[int, RunSession], dict[int, tuple[Tensor, Tensor | None]]]:
    """Open every run's folder, held open by ``held``, building the runs with one copy of their
    data: the sessions of the runs to train (by position), each with its own RNG state as it
    would be alone; the runs finished already, held by another process, or failing to open get
    their result in ``results``."""
    shared = _SharedData()
    sessions: dict[int, RunSession] = {}
    rng: dict[int, tuple[Tensor, Tensor | None]] = {}
    for i, cfg in enumerate(cfgs):
        try:
            session = held.enter_context(open_session(cfg, Reporter(), build=shared.build))
        except RunLockedError as exc:
            results[i] = StackResult(cfg, "locked", error=str(exc))
            continue
        except Exception as exc:
            results[i] = StackResult(cfg, "failed", error=f"{type(exc).__name__}: {exc}")
            continue
        if isinstance(session, RunSession):
            sessions[i] = session
            rng[i] = _rng_state(session.run.device)
        else:
            results[i] = StackResult(cfg, "finished", summary=session)
    return sessions, rng


def _train_members(
    sessions: list[RunSession],
    rng: list[tuple[Tensor, Tensor | None]],
    *,
    stop_after: int | None,
    graph: bool,
) -> dict[int, dict]:
    """The epochs of one stack; the closing summary of every member (by position)."""
    done: dict[int, dict] = {}

    def per_run(i: int, fn, *args, **kwargs):
        """``fn`` for member i with its own RNG state; a failure closes that run only."""
        _set_rng_state(rng[i], sessions[i].run.device)
        try:
            with sessions[i].recording():
                return fn(*args, **kwargs)
        except Exception:
            done[i] = sessions[i].summary or {"status": "failed"}
            return None

    stack = Stack([s.run for s in sessions], graph=graph)
    try:
        fresh = [i for i in range(len(sessions)) if sessions[i].run.epoch == 0]
        first = diagnose(
            stack, sessions, fresh, 0, per_run
        )  # the epoch-0 probes, before any update
    except Exception as exc:  # the shared probe failed: every run of the stack with it
        return {
            i: sessions[i].write_summary("failed", error=f"{type(exc).__name__}: {exc}")
            for i in range(len(sessions))
        }
    for i in range(len(sessions)):
        if i not in done:
            per_run(i, sessions[i].begin, first.get(i))
    live = [i for i in range(len(sessions)) if i not in done]
    if not live:
        return done
    cfg = sessions[live[0]].run.cfg
    try:
        while live and sessions[live[0]].run.epoch < cfg.epochs:
            if stop_after is not None and sessions[live[0]].run.epoch >= stop_after:
                for i in live:
                    done[i] = sessions[i].write_summary("interrupted")
                return done
            _stack_epoch(stack, sessions, live, cfg.eval_batch_size, per_run, done)
    except KeyboardInterrupt:
        for i in live:
            done[i] = sessions[i].write_summary("interrupted")
        raise
    except Exception as exc:  # the shared step failed: every live run of the stack with it
        for i in live:
            done[i] = sessions[i].write_summary("failed", error=f"{type(exc).__name__}: {exc}")
        return done
    for i in live:
        done[i] = sessions[i].write_summary("finished")
    return done


def _stack_epoch(
    stack: Stack,
    sessions: list[RunSession],
    live: list[int],
    eval_batch_size: int,
    per_run,
    done: dict[int, dict],
) -> None:
    """One epoch of the members ``live``, trained and evaluated as one program, then each
    member's epoch closed on its own (``per_run``). A member that ends — diverged, or its own work
    failed — leaves ``live``, with its closing summary in ``done``."""
    epoch = sessions[live[0]].run.epoch
    t0 = time.perf_counter()
    trained = stack.train_epoch(epoch)
    data = sessions[live[0]].run.data
    tests = stack.evaluate(data.x_test, data.y_test, eval_batch_size)
    stack.unstack()
    share = (time.perf_counter() - t0) / len(live)  # each live run's part of the stack's time
    finite = [i for i in live if math.isfinite(trained[i]["train/loss"])]
    figures = diagnose(stack, sessions, finite, epoch + 1, per_run)
    trained_together = len(live)
    for i in list(live):
        if i in done:  # its own probe failed
            live.remove(i)
            continue
        ended = per_run(
            i,
            sessions[i].end_epoch,
            trained[i],
            share,
            test=tests[i],
            figures=figures.get(i),
            extra={"stack/runs": trained_together},
        )
        if i in done:
            live.remove(i)
        elif ended is not None:
            done[i] = ended
            live.remove(i)
