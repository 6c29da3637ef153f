"""creditaudit's BP training epoch against a minimal hand-written PyTorch loop.

Same model (the resmlp definition written out by hand), same on-device data, batch size, optimizer
and thread count; both measured in this one process, alternating, after a warm-up that is not
timed. Prints seconds per epoch for each and their ratio (target: creditaudit / hand-written <= 1.10).

    python bench/bench_epoch.py [dataset=fashion_mnist] [d=256] [L=4] [threads=2] [repeats=3] [device=auto]
"""
from __future__ import annotations

import statistics
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

from creditaudit.config import TrainConfig, apply_overrides
from creditaudit.train.run import build_run, train_epoch


class HandResMLP(nn.Module):
    """resmlp written out by hand: Linear embedding, L pre-LN GELU blocks, terminal LN, head."""

    def __init__(self, d_in: int, d: int, L: int, classes: int):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, d)) for _ in range(L))
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


def main(argv: list[str]) -> None:
    opts = dict(a.split("=", 1) for a in argv)
    repeats = int(opts.pop("repeats", 3))
    threads = int(opts.pop("threads", torch.get_num_threads()))
    torch.set_num_threads(threads)
    cfg = apply_overrides(TrainConfig(), [f"{k}={v}" for k, v in {
        "rule": "bp", "dataset": "fashion_mnist", "d": 256, "L": 4, "epochs": repeats + 1, "progress": "false", **opts}.items()])
    run = build_run(cfg)
    x, y = run.data.x_train, run.data.y_train
    hand = HandResMLP(x[0].numel(), cfg.model.d or 256, 4 if cfg.model.L is None else cfg.model.L, run.data.num_classes).to(run.device)
    hand_opt = torch.optim.AdamW(hand.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    gen = torch.Generator().manual_seed(0)

    # Warm-up (allocator, kernels, first-touch): 20 steps each, untimed.
    for i, (xb, yb) in enumerate(run.loader.epoch(0)):
        if i == 20:
            break
        F.cross_entropy(hand(xb), yb).backward()
        hand_opt.zero_grad(set_to_none=True)
    sync(run.device)

    t_lib, t_hand = [], []
    for r in range(repeats):
        t0 = time.perf_counter(); train_epoch(run); run.epoch += 1; sync(run.device); t_lib.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); hand_epoch(hand, hand_opt, x, y, cfg.batch_size, gen); sync(run.device); t_hand.append(time.perf_counter() - t0)
    lib, ref = statistics.median(t_lib), statistics.median(t_hand)
    print(f"device {run.device}, threads {threads}, dataset {cfg.data.dataset} ({x.shape[0]} train), "
          f"resmlp d={cfg.model.d or 256} L={4 if cfg.model.L is None else cfg.model.L}, batch {cfg.batch_size}, {repeats} epochs each")
    print(f"creditaudit BP epoch : {lib:7.3f} s  (runs: {', '.join(f'{t:.3f}' for t in t_lib)})")
    print(f"hand-written epoch   : {ref:7.3f} s  (runs: {', '.join(f'{t:.3f}' for t in t_hand)})")
    print(f"ratio creditaudit / hand-written: {lib / ref:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main(sys.argv[1:])
