"""The per-epoch probe of R runs: each alone, against all of them taken together as a stack does.

    python bench/bench_probe.py [rule=dfa] [arch=resmlp] [stack=8] [full=0] [repeats=3] [device=auto] [threads=0]
                                [any other run override, e.g. dataset=digits d=64]

Builds R runs of one kind (seeds 1..R) on the study's data, and times, alternating, after a warm-up
that is not timed: R calls of the probe alone (``diagnostics.probe.probe``, what a run alone does at
the end of an epoch) and one stacked probe (``Stack.probe``'s shared part under ``vmap``, then each
run's ``finish_probe``: what a stack does). ``full=1`` times the full probe (ρ_l and (c) too, taken after
the last epoch), ``full=0`` the cheap one (every epoch). Prints the seconds per run for each and their
ratio. The figures are the same either way (``tests/test_stack.py``).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from creditaudit.config import TrainConfig, apply_overrides, resolve_rule_options
from creditaudit.diagnostics.probe import probe
from creditaudit.training.run import resolve_device
from creditaudit.training.stack import Stack, _SharedData, finish_probe, why_not_stacked


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str]) -> None:
    opts = {
        "rule": "dfa",
        "arch": "resmlp",
        "stack": "8",
        "full": "0",
        "repeats": "3",
        "device": "auto",
        "threads": "0",
    }
    overrides = []
    for a in argv:
        k, _, v = a.partition("=")
        if k in ("stack", "full", "repeats"):
            opts[k] = v
        else:
            opts[k] = v
            overrides.append(a)
    R, full, repeats = int(opts["stack"]), opts["full"] == "1", int(opts["repeats"])
    base = [f"rule={opts['rule']}", f"arch={opts['arch']}", "progress=false", *overrides]
    cfgs = [
        resolve_rule_options(apply_overrides(TrainConfig(), [*base, f"seed={s}"]))
        for s in range(1, R + 1)
    ]
    reason = why_not_stacked(cfgs[0])
    if reason:
        sys.exit(reason)
    if cfgs[0].threads:
        torch.set_num_threads(cfgs[0].threads)
    shared = _SharedData()
    runs = [shared.build(c) for c in cfgs]
    device = resolve_device(cfgs[0].device)
    stack = Stack(runs)
    diag = cfgs[0].diag

    def alone() -> None:
        for run in runs:
            probe(run.model, run.rule, run.data, run.cfg.diag, full=full, seed=run.cfg.seed)

    def together() -> None:
        for run, (figures, rho) in zip(
            runs, stack.probe(list(range(R)), diag, full=full), strict=True
        ):
            finish_probe(run, figures, rho, diag, full=full)

    print(
        f"{opts['rule']} on {opts['arch']} ({cfgs[0].data.dataset}), {R} runs, {'full' if full else 'cheap'} probe, "
        f"device {device}, {torch.get_num_threads()} threads"
    )
    times: dict[str, list[float]] = {"alone": [], "stacked": []}
    for i in range(repeats + 1):
        for name, fn in (("alone", alone), ("stacked", together)):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if i:  # the first round warms up
                times[name].append((time.perf_counter() - t0) / R)
    a, s = statistics.median(times["alone"]), statistics.median(times["stacked"])
    print(f"alone    {a * 1e3:9.1f} ms per run")
    print(f"stacked  {s * 1e3:9.1f} ms per run")
    print(f"ratio    {s / a:9.2f}  (stacked / alone)")


if __name__ == "__main__":
    main(sys.argv[1:])
