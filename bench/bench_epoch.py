"""creditaudit's BP training epoch against a minimal hand-written PyTorch loop.

Same model (the resmlp definition written out by hand), same on-device data, batch size, optimizer
and thread count; both measured in this one process, alternating, after a warm-up that is not
timed. Prints seconds per epoch for each and their ratio (target: creditaudit / hand-written <= 1.10).

    python bench/bench_epoch.py [dataset=fashion_mnist] [d=256] [L=4] [threads=2] [repeats=3] [device=auto]
                                [stack=1] [graph=0] [rule=bp]

``stack=R`` compares a stack of R runs (``training/stack.py``: one program with a run axis) with the
hand-written loop stacked the same way (``torch.func.stack_module_state`` + ``vmap``, one AdamW over
the stacked parameters); ``graph=1`` replays each one's step as a CUDA graph (capturable AdamW,
learning rate on the device). Both modes print the time per run-step (an epoch's time / (steps ×
R)) and the ratio (target <= 1.2). ``rule=`` trains another stackable rule on creditaudit's side
(the hand-written loop is BP).
"""

from __future__ import annotations

import copy
import statistics
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

from creditaudit.config import TrainConfig, apply_overrides
from creditaudit.training.run import build_run, train_epoch


class HandResMLP(nn.Module):
    """resmlp written out by hand: Linear embedding, L pre-LN GELU blocks, terminal LN, head."""

    def __init__(self, d_in: int, d: int, L: int, classes: int):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
            for _ in range(L)
        )
        self.out = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, classes))

    def forward(self, x):
        h = self.embed(x.flatten(1))
        for b in self.blocks:
            h = h + b(h)
        return self.out(h)


def hand_epoch(model, opt, x, y, batch: int, gen: torch.Generator) -> float:
    model.train()
    perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
    total = torch.zeros((), device=x.device)
    for i in range(0, x.shape[0], batch):
        idx = perm[i : i + batch]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.detach()
    return total.item()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HandStack:
    """R hand-written resmlp runs stacked on a leading axis, one AdamW; optionally CUDA-graphed
    after two eager steps per batch shape (the recipe training/stack.py follows)."""

    def __init__(self, models: list[nn.Module], lr: float, wd: float, graph: bool):
        from torch.func import functional_call, stack_module_state, vmap

        self.params, self.buffers = stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")
        self.loss = vmap(lambda p, b, x, y: F.cross_entropy(functional_call(base, (p, b), (x,)), y))
        device = next(iter(self.params.values())).device
        self.graph = graph and device.type == "cuda"
        lr_arg = torch.tensor(lr, device=device) if self.graph else lr
        self.opt = torch.optim.AdamW(
            list(self.params.values()),
            lr=lr_arg,
            weight_decay=wd,
            foreach=True,
            capturable=self.graph,
        )
        self.total = torch.zeros((), device=device)
        self.graphs: dict = {}
        self.seen: dict = {}

    def _step(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        losses = self.loss(self.params, self.buffers, x, y)
        losses.sum().backward()
        self.opt.step()
        self.total += losses.detach().sum()

    def step(self, x, y):
        if not self.graph:
            return self._step(x, y)
        key = tuple(x.shape)
        if key in self.graphs:
            g, sx, sy = self.graphs[key]
            sx.copy_(x)
            sy.copy_(y)
            return g.replay()
        self.seen[key] = self.seen.get(key, 0) + 1
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            if self.seen[key] <= 2:
                self._step(x, y)
                g = None
            else:
                g, sx, sy = torch.cuda.CUDAGraph(), x.clone(), y.clone()
                self.opt.zero_grad(set_to_none=True)
                with torch.cuda.graph(g, stream=side):
                    self._step(sx, sy)
                self.graphs[key] = (g, sx, sy)
        torch.cuda.current_stream().wait_stream(side)
        if g is not None:
            g.replay()

    def epoch(self, x, y, batch: int, R: int, gen: torch.Generator) -> float:
        perms = torch.stack([torch.randperm(x.shape[0], generator=gen) for _ in range(R)]).to(
            x.device
        )  # (R, N)
        for i in range(0, x.shape[0], batch):
            idx = perms[:, i : i + batch]
            self.step(x[idx], y[idx])
        return self.total.item()


def stacked(argv_opts: dict, repeats: int, threads: int) -> None:
    """stack=R / graph=1: a stack of R creditaudit runs against R hand-written runs stacked alike."""
    from creditaudit.training.stack import Stack

    R, graph = int(argv_opts.pop("stack", 1)), argv_opts.pop("graph", "0") in ("1", "true")
    rule = argv_opts.pop("rule", "bp")
    cfgs = [
        apply_overrides(
            TrainConfig(),
            [
                f"{k}={v}"
                for k, v in {
                    "rule": rule,
                    "dataset": "fashion_mnist",
                    "d": 256,
                    "L": 4,
                    "epochs": repeats + 2,
                    "progress": "false",
                    "seed": s,
                    "augment": "none",
                    **argv_opts,
                }.items()
            ],
        )
        for s in range(R)
    ]
    runs = [build_run(cfgs[0])]
    runs += [build_run(c, data=runs[0].data) for c in cfgs[1:]]
    stack = Stack(runs, graph=graph)
    x, y = runs[0].data.x_train, runs[0].data.y_train
    cfg = cfgs[0]
    d, L = cfg.model.d or 256, 4 if cfg.model.L is None else cfg.model.L
    hand = HandStack(
        [
            HandResMLP(x[0].numel(), d, L, runs[0].data.num_classes).to(runs[0].device)
            for _ in range(R)
        ],
        cfg.optim.lr,
        cfg.optim.weight_decay,
        graph,
    )
    gen = torch.Generator().manual_seed(0)
    device = runs[0].device
    # Warm-up: one whole epoch each (graphs are captured in it), untimed.
    stack.train_epoch(0)
    hand.epoch(x, y, cfg.batch_size, R, gen)
    sync(device)
    t_lib, t_hand = [], []
    for r in range(repeats):
        t0 = time.perf_counter()
        stack.train_epoch(r + 1)
        sync(device)
        t_lib.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        hand.epoch(x, y, cfg.batch_size, R, gen)
        sync(device)
        t_hand.append(time.perf_counter() - t0)
    steps = len(runs[0].loader)
    lib, ref = statistics.median(t_lib), statistics.median(t_hand)
    mode = ("graphed" if graph and device.type == "cuda" else "eager") + f", stack of {R}"
    print(
        f"device {device}, threads {threads}, dataset {cfg.data.dataset} ({x.shape[0]} train), resmlp d={d} L={L}, "
        f"batch {cfg.batch_size}, {mode}, {repeats} epochs each"
    )
    print(
        f"creditaudit {rule} epoch : {lib:7.3f} s = {lib / steps / R * 1e3:.3f} ms per "
        f"run-step  (runs: {', '.join(f'{t:.3f}' for t in t_lib)})"
    )
    print(
        f"hand-written BP epoch : {ref:7.3f} s = {ref / steps / R * 1e3:.3f} ms per run-step  "
        f"(runs: {', '.join(f'{t:.3f}' for t in t_hand)})"
    )
    print(f"ratio creditaudit / hand-written: {lib / ref:.3f}  (target <= 1.2 in the same mode)")


def main(argv: list[str]) -> None:
    opts = dict(a.split("=", 1) for a in argv)
    repeats = int(opts.pop("repeats", 3))
    threads = int(opts.pop("threads", torch.get_num_threads()))
    torch.set_num_threads(threads)
    if int(opts.get("stack", 1)) > 1 or opts.get("graph", "0") in ("1", "true"):
        return stacked(opts, repeats, threads)
    opts.pop("stack", None)
    opts.pop("graph", None)
    cfg = apply_overrides(
        TrainConfig(),
        [
            f"{k}={v}"
            for k, v in {
                "rule": "bp",
                "dataset": "fashion_mnist",
                "d": 256,
                "L": 4,
                "epochs": repeats + 1,
                "progress": "false",
                "augment": "none",
                **opts,
            }.items()
        ],
    )
    run = build_run(cfg)
    x, y = run.data.x_train, run.data.y_train
    hand = HandResMLP(
        x[0].numel(),
        cfg.model.d or 256,
        4 if cfg.model.L is None else cfg.model.L,
        run.data.num_classes,
    ).to(run.device)
    hand_opt = torch.optim.AdamW(
        hand.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
    )
    gen = torch.Generator().manual_seed(0)

    # Warm-up (allocator, kernels, first-touch): 20 steps each, untimed.
    for i, (xb, yb) in enumerate(run.loader.epoch(0)):
        if i == 20:
            break
        F.cross_entropy(hand(xb), yb).backward()
        hand_opt.zero_grad(set_to_none=True)
    sync(run.device)

    t_lib, t_hand = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        train_epoch(run)
        run.epoch += 1
        sync(run.device)
        t_lib.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        hand_epoch(hand, hand_opt, x, y, cfg.batch_size, gen)
        sync(run.device)
        t_hand.append(time.perf_counter() - t0)
    lib, ref = statistics.median(t_lib), statistics.median(t_hand)
    print(
        f"device {run.device}, threads {threads}, dataset {cfg.data.dataset} ({x.shape[0]} train), "
        f"resmlp d={cfg.model.d or 256} L={4 if cfg.model.L is None else cfg.model.L}, batch "
        f"{cfg.batch_size}, {repeats} epochs each"
    )
    print(f"creditaudit BP epoch : {lib:7.3f} s  (runs: {', '.join(f'{t:.3f}' for t in t_lib)})")
    print(f"hand-written epoch   : {ref:7.3f} s  (runs: {', '.join(f'{t:.3f}' for t in t_hand)})")
    print(f"ratio creditaudit / hand-written: {lib / ref:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main(sys.argv[1:])
