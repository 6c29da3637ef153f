"""How a sweep's runs become jobs: stacks of runs of one kind, the longest first.

``--stack N`` groups the planned runs that can share a stack (``training/stack.py``: the same
:func:`~creditaudit.training.stack.stack_key`, a rule that stacks) into stacks of at most N runs, of
near-equal sizes (a group of 20 with N=16 gives 10 + 10, not 16 + 4); every other run is a job of
its own, trained as today. Jobs are ordered longest first, so that the last job to start is a short
one (the classic LPT schedule), by an estimate of their work: optimizer steps × the rule's relative
cost (EP relaxes T times per step) × how much of a stack's work grows with its size.

A job's worker sizes its stack to the device's memory (``train.stack.max_stack``) and trains what
does not fit as a second stack after the first.
"""

from __future__ import annotations

import math

from creditaudit.config import TrainConfig

#: relative cost of a step per rule, BP = 1 (bench_study's per-kind step times: an EP step is about
#: 6–7 BP steps at T = 20, sb about 2, cb about 3; the rest within 1.5×). Only the jobs' order uses it.
RULE_COST = {"ep": 7.0, "sb": 2.0, "cb": 3.0}
#: how a stack's step time grows per added run, relative to one run: about 0.1 on a GPU, which one
#: run leaves mostly idle (a hand-written stack of 18 BP runs took 1.08× one run's step on an H200),
#: about 1 on a CPU thread; it only orders jobs of different sizes
STACK_GROWTH = 0.1


def job_cost(job: list[TrainConfig]) -> float:
    """Relative work of a job (see the module docstring); only its order matters."""
    cfg = job[0]
    base = cfg.rule.split("_")[0]
    examples = cfg.data.train_subset or 50_000
    steps = cfg.epochs * math.ceil(examples / cfg.batch_size)
    size = 1.0 + STACK_GROWTH * (len(job) - 1)
    return steps * RULE_COST.get(base, 1.0) * size


def pack(cfgs: list[TrainConfig], stack: int) -> list[list[TrainConfig]]:
    """The sweep's jobs: lists of configs, one stack each (a single run when ``stack`` is 1 or the
    run cannot stack), longest first; configs keep their order within a job."""
    from creditaudit.training.stack import stack_key, why_not_stacked

    if stack < 1:
        raise ValueError(f"--stack must be >= 1, got {stack}")
    groups: dict[str, list[TrainConfig]] = {}
    jobs: list[list[TrainConfig]] = []
    for cfg in cfgs:
        if stack == 1 or why_not_stacked(cfg):
            jobs.append([cfg])
        else:
            groups.setdefault(stack_key(cfg), []).append(cfg)
    for members in groups.values():
        n = math.ceil(len(members) / stack)
        size = math.ceil(len(members) / n)
        jobs += [members[i : i + size] for i in range(0, len(members), size)]
    return sorted(jobs, key=job_cost, reverse=True)
