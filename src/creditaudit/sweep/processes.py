"""Run many training runs on one machine as parallel single-thread worker processes.

A job is one run, trained by :func:`creditaudit.train.trainer.train` in its own run folder, or a
stack of runs of one kind (``--stack N``, ``sweep/packing.py``), trained by
:func:`creditaudit.train.stack.train_stack`, each still in its own folder; so the pool
inherits everything a run guarantees: a finished run is skipped, a killed one resumes, a folder
another process is training is refused by its lock (reported here as ``locked``, not retried), and
a run that crashes or diverges is recorded with its status while the others go on.

Measured on a 2-core CPU: two single-thread processes give ~1.3–1.6× the throughput of one
two-thread process, hence one thread per worker. Workers start with ``spawn`` (no forked torch
thread pools).
"""
from __future__ import annotations

import multiprocessing
import os
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, TypeVar

from creditaudit import config as C
from creditaudit.config import TrainConfig
from creditaudit.train.allocator import available_memory


@dataclass
class RunOutcome:
    run: str  # <setting>/<rule>__<arch>__s<seed>
    status: str  # finished | diverged | failed | interrupted | locked
    error: str | None = None
    wall_s: float = 0.0


def _label(cfg: TrainConfig) -> str:
    path = C.run_path(cfg)
    return f"{path.parent.name}/{path.name}"


def _outcome(cfg: TrainConfig, status: str, summary: dict | None, error: str | None) -> RunOutcome:
    return RunOutcome(_label(cfg), status, error, float((summary or {}).get("wall_s") or 0.0))


def _config(cfg_dict: dict, threads: int) -> TrainConfig:
    """A worker's config; ``threads`` applies when the config leaves the thread count to torch
    (threads=0): train() and train_stack() apply it."""
    cfg = C.from_dict(cfg_dict)
    if not cfg.threads and threads:
        cfg.threads = threads
    return cfg


def _failed(cfg: TrainConfig, exc: Exception) -> RunOutcome:
    return RunOutcome(_label(cfg), "failed", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}")


def _train_job(cfg_dicts: list[dict], graph: bool, threads: int) -> list[RunOutcome]:
    """Worker body for a job of one run or a stack: never raises (a failure is an outcome)."""
    if len(cfg_dicts) == 1:
        return [_train_one(cfg_dicts[0], threads)]
    from creditaudit.train.stack import train_stack

    cfgs = [_config(d, threads) for d in cfg_dicts]
    try:
        return [_outcome(r.cfg, r.status, r.summary, r.error) for r in train_stack(cfgs, graph=graph)]
    except Exception as exc:
        return [_failed(c, exc) for c in cfgs]


def _train_one(cfg_dict: dict, threads: int) -> RunOutcome:
    """Worker body: never raises (a failure is an outcome)."""
    from creditaudit.runs.folder import RunLockedError
    from creditaudit.train.trainer import train

    cfg = _config(cfg_dict, threads)
    try:
        summary = train(cfg)
        return _outcome(cfg, summary["status"], summary, summary.get("error"))
    except RunLockedError as exc:
        return RunOutcome(_label(cfg), "locked", str(exc))
    except Exception as exc:  # recorded in the run's summary by train(); reported here too
        return _failed(cfg, exc)


# ---------------------------------------------------------------------------------------------
# How many workers by default: one per core, as many as the memory holds
# ---------------------------------------------------------------------------------------------
# The resident set a worker reaches while training its runs, rounded up: torch itself ~0.3 GiB, the
# dataset and its loading transients, model, optimizer and the probes (vit_mini's full probe is the
# largest; a worker keeps the peak of its earlier runs, and train/allocator.py keeps freed memory in
# the process). Measured with bench/bench_study.py on the cpu profile (docs/performance.md): under
# 1 GiB for resmlp runs, about 2 for smallcnn, 5.7 for a worker that trained vit_mini. One figure
# for every run keeps the choice simple; --workers N decides otherwise.
RUN_MEMORY_BYTES = 6 * 2**30


def default_workers(per_run_bytes: int = RUN_MEMORY_BYTES, *, cores: int | None = None,
                    available: int | None = None) -> int:
    """The worker count of ``workers=0``: min(CPU cores, available memory // ``per_run_bytes``), at
    least 1. ``cores``/``available`` default to this machine's (``os.cpu_count()``,
    :func:`available_memory`; memory unknown: cores alone)."""
    cores = cores or os.cpu_count() or 1
    if available is None:
        available = available_memory()
    if available is None:
        return cores
    return max(1, min(cores, available // max(per_run_bytes, 1)))


R = TypeVar("R")


def in_processes(fn: Callable[..., R], jobs: list[tuple[Any, ...]], *, workers: int = 0) -> Iterator[R]:
    """``fn(*job, threads)`` for every job, yielded as each finishes: in this process when
    ``workers`` is 1 or there is one job (``threads`` 0: as configured), else in ``workers``
    spawned processes of one thread each (0 = :func:`default_workers`: one per CPU core, as many as
    the available memory holds). ``fn`` must not raise: a failure is one of its results. The sweep's
    runs and the exploit study's units both run through here."""
    workers = workers or default_workers()
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            yield fn(*job, 0)
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
        futures = [pool.submit(fn, *job, 1) for job in jobs]
        for fut in as_completed(futures):
            yield fut.result()


def run_many(
    configs: Iterable[TrainConfig],
    *,
    workers: int = 0,
    stack: int = 1,
    graph: bool = False,
    on_done: Callable[[RunOutcome, int, int], None] | None = None,
) -> list[RunOutcome]:
    """Train every config; ``workers`` parallel processes (0 = :func:`default_workers`; 1 = in this
    process, threads as configured), each taking one job at a time: a run, or a stack of at most
    ``stack`` runs of one kind (``graph``: CUDA-graphed steps). Returns one outcome per config, in
    completion order."""
    from creditaudit.sweep.packing import pack

    configs = list(configs)
    for cfg in configs:
        C.load_plugins(cfg)  # rule files' paths made absolute for the workers
        C.validate(cfg)
    outcomes: list[RunOutcome] = []
    jobs = [([C.to_dict(cfg) for cfg in job], graph) for job in pack(configs, stack)]
    for done in in_processes(_train_job, jobs, workers=workers):
        for outcome in done:
            outcomes.append(outcome)
            if on_done:
                on_done(outcome, len(outcomes), len(configs))
    return outcomes
