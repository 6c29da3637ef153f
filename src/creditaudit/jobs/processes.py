"""Run many training runs on one machine as parallel single-thread worker processes.

A job is one run, trained by :func:`creditaudit.training.trainer.train` in its own run folder, or a
stack of runs of one kind (``--stack N``, ``jobs/packing.py``), trained by
:func:`creditaudit.training.stack.train_stack`, each still in its own folder; so the pool
inherits everything a run guarantees: a finished run is skipped, a killed one resumes, a folder
another process is training is refused by its lock (reported here as ``locked``, not retried), and
a run that crashes or diverges is recorded with its status while the others go on.

Measured on a 2-core CPU: two single-thread processes give ~1.3–1.6× the throughput of one
two-thread process, hence one thread per worker. Workers start with ``spawn`` (no forked torch
thread pools).
"""

from __future__ import annotations

import _thread
import contextlib
import io
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Generic, TypeVar

from creditaudit import config
from creditaudit.config import TrainConfig
from creditaudit.training.allocator import available_memory


@dataclass
class RunOutcome:
    run: str  # <setting>/<rule>__<arch>__s<seed>
    status: str  # finished | diverged | failed | interrupted | locked
    error: str | None = None
    wall_s: float = 0.0


def _label(cfg: TrainConfig) -> str:
    path = config.run_path(cfg)
    return f"{path.parent.name}/{path.name}"


def _outcome(cfg: TrainConfig, status: str, summary: dict | None, error: str | None) -> RunOutcome:
    return RunOutcome(_label(cfg), status, error, float((summary or {}).get("wall_s") or 0.0))


def _config(cfg_dict: dict, threads: int) -> TrainConfig:
    """A worker's config, checked in the parent (:func:`config.from_checked_dict`); ``threads``
    applies when the config leaves the thread count to torch (threads=0): train() and
    train_stack() apply it."""
    if threads and not cfg_dict.get("threads"):
        cfg_dict = {**cfg_dict, "threads": threads}
    return config.from_checked_dict(cfg_dict)


def _failed(cfg: TrainConfig, exc: Exception) -> RunOutcome:
    return RunOutcome(
        _label(cfg), "failed", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
    )


def _train_job(cfg_dicts: list[dict], graph: bool, threads: int) -> list[RunOutcome]:
    """Worker body for a job of one run or a stack: never raises (a failure is an outcome)."""
    if len(cfg_dicts) == 1:
        return [_train_one(cfg_dicts[0], threads)]
    from creditaudit.training.stack import train_stack

    cfgs = [_config(d, threads) for d in cfg_dicts]
    try:
        return [
            _outcome(r.cfg, r.status, r.summary, r.error) for r in train_stack(cfgs, graph=graph)
        ]
    except Exception as exc:
        return [_failed(c, exc) for c in cfgs]


def _train_one(cfg_dict: dict, threads: int) -> RunOutcome:
    """Worker body: never raises (a failure is an outcome)."""
    from creditaudit.runs.folder import RunLockedError
    from creditaudit.training.trainer import train

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
# largest; a worker keeps the peak of its earlier runs, and training/allocator.py keeps freed memory in
# the process). Measured with bench/bench_study.py on the cpu profile (docs/performance.md): under
# 1 GiB for resmlp runs, about 2 for smallcnn, 5.7 for a worker that trained vit_mini. One figure
# for every run keeps the choice simple; --workers N decides otherwise.
RUN_MEMORY_BYTES = 6 * 2**30


def default_workers(
    per_run_bytes: int = RUN_MEMORY_BYTES, *, cores: int | None = None, available: int | None = None
) -> int:
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

#: how many times a job whose worker process died is started again in a fresh worker (its runs
#: resume from their checkpoints), as Ray retries a task whose worker died
RETRIES = 1


def worker_death(exitcode: int | None) -> str:
    """Why a worker process ended without its job's result, in words."""
    if exitcode is not None and exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name}" + (
            " (out of memory?)" if -exitcode == signal.SIGKILL else ""
        )
    return f"exited with status {exitcode}"


def in_processes(
    fn: Callable[..., R],
    jobs: list[tuple[Any, ...]],
    *,
    workers: int = 0,
    lost: Callable[[tuple[Any, ...], str], R] | None = None,
    name: Callable[[tuple[Any, ...]], str] = lambda job: "a job",
    say: Callable[[str], None] | None = None,
    died: Callable[[str], None] | None = None,
) -> Iterator[R]:
    """``fn(*job, threads)`` for every job, yielded as each finishes: in this process when
    ``workers`` is 1 or there is one job (``threads`` 0: as configured), else in ``workers``
    spawned processes of one thread each (0 = :func:`default_workers`: one per CPU core, as many as
    the available memory holds). ``fn`` must not raise: a failure is one of its results. The sweep's
    runs and the exploit study's units both run through here.

    A worker that dies (killed by a signal — the out-of-memory killer —, or exiting) costs its own
    job only: a fresh worker replaces it, the job starts again once (:data:`RETRIES`; its runs
    resume from their checkpoints, a dead process's lock is taken over), and when it dies again
    ``lost(job, why)`` is its result. ``died`` gets one line per death, naming the job by
    ``name(job)`` (default: ``say``); ``say`` the lines the workers write to ``sys.stderr``, so that
    whoever draws the screen prints them (default: this process's stderr)."""
    workers = workers or default_workers()
    if workers == 1 or len(jobs) <= 1:
        for job in jobs:
            yield fn(*job, 0)
        return
    if lost is None:
        raise TypeError(
            "in_processes: with several workers, lost(job, why) must say what a job whose worker died gave"
        )
    say = say or _to_stderr
    yield from _Pool(fn, jobs, min(workers, len(jobs)), lost, name, say, died or say).results()


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class _Worker:
    """One spawned worker process and the pipe its jobs, results and stderr lines go through."""

    def __init__(self, ctx: Any, fn: Callable[..., Any]):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_serve, args=(child, fn), name="creditaudit-worker")
        self.process.start()
        child.close()
        self.job: int | None = None  # the index of the job it is running

    def stop(self, timeout: float) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(None)
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        self.conn.close()


class _Relay(io.TextIOBase):
    """A worker's ``sys.stderr``: each line goes to the parent (``("say", line)``), which prints it
    where the screen is drawn, instead of through a live progress bar."""

    def __init__(self, conn: Any, lock: threading.Lock):
        self.conn, self.lock, self.buffer = conn, lock, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.buffer += text
        *lines, self.buffer = self.buffer.split("\n")
        for line in lines:
            with self.lock:
                self.conn.send(("say", line))
        return len(text)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _watch_parent(parent: int, every: float = 1.0) -> None:
    """Orphaned — the parent killed outright (SIGKILL, a crash) —, a worker stops its run as Ctrl-C
    stops it: the run records itself interrupted and frees its folder, instead of training on for
    no one and holding its lock against the next sweep."""
    while os.getppid() == parent:
        time.sleep(every)
    _thread.interrupt_main()


def _serve(conn: Any, fn: Callable[..., Any]) -> None:
    """A worker's loop: a job in, its result out (``("done", i, result)``), until told to stop
    (``None``), interrupted (SIGINT, or SIGTERM from a parent that stops early) or orphaned."""
    lock = threading.Lock()
    sys.stderr = _Relay(conn, lock)
    signal.signal(signal.SIGTERM, _interrupt)
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError, KeyboardInterrupt):
            return
        if message is None:
            return
        i, job = message
        try:
            result = fn(*job, 1)
        except KeyboardInterrupt:  # the run has recorded itself interrupted
            return
        sys.stderr.flush()
        with lock:
            conn.send(("done", i, result))


class _Pool(Generic[R]):
    """Workers that a dead one does not take down (``concurrent.futures``' pool breaks as a whole:
    ``BrokenProcessPool``). Each worker has its own pipe, so a worker killed while it writes
    corrupts nothing the others use."""

    def __init__(
        self,
        fn: Callable[..., R],
        jobs: list[tuple[Any, ...]],
        size: int,
        lost: Callable[[tuple[Any, ...], str], R],
        name: Callable[[tuple[Any, ...]], str],
        say: Callable[[str], None],
        died: Callable[[str], None],
    ):
        self.fn, self.jobs, self.size, self.lost, self.name = fn, jobs, size, lost, name
        self.say, self.died = say, died
        self.ctx = multiprocessing.get_context("spawn")
        self.pending: deque[int] = deque(range(len(jobs)))
        self.starts = [0] * len(jobs)
        self.workers: list[_Worker] = []

    def results(self) -> Iterator[R]:
        left = len(self.jobs)
        try:
            while left:
                self._assign()
                ready = wait(
                    [w.conn for w in self.workers] + [w.process.sentinel for w in self.workers]
                )
                for w in list(self.workers):
                    if w.conn in ready or w.process.sentinel in ready:
                        for result in self._collect(w):
                            left -= 1
                            yield result
        finally:
            for w in self.workers:
                if left and w.job is not None:  # stopped early (Ctrl-C, SIGTERM): stop its run too
                    w.process.terminate()
                w.stop(timeout=30)

    def _assign(self) -> None:
        """Give every idle worker a pending job; start workers (fresh ones for dead ones) as needed."""
        while self.pending and len(self.workers) < self.size:
            self.workers.append(_Worker(self.ctx, self.fn))
        for w in self.workers:
            if w.job is None and self.pending:
                w.job = self.pending.popleft()
                self.starts[w.job] += 1
                w.conn.send((w.job, self.jobs[w.job]))

    def _collect(self, w: _Worker) -> list[R]:
        """What ``w`` sent (its stderr lines said, its result returned); when it died, what its job
        comes to (nothing yet when it starts again)."""
        try:
            while w.conn.poll():
                message = w.conn.recv()
                if message[0] == "say":
                    self.say(message[1])
                else:
                    w.job = None
                    return [message[2]]
        except (EOFError, OSError):
            pass  # it died writing
        if w.process.is_alive():
            return []
        w.process.join()
        self.workers.remove(w)
        w.conn.close()
        if w.job is None:  # died idle
            return []
        job, w.job = w.job, None
        why = f"{self.name(self.jobs[job])}: its worker (pid {w.process.pid}) {worker_death(w.process.exitcode)}"
        if self.starts[job] <= RETRIES:
            self.died(f"{why}; starting it again, from its checkpoint")
            self.pending.appendleft(job)
            return []
        self.died(f"{why}, again; given up")
        return [
            self.lost(
                self.jobs[job],
                f"its worker {worker_death(w.process.exitcode)}, {self.starts[job]} times",
            )
        ]


def _lost_job(job: tuple[Any, ...], why: str) -> list[RunOutcome]:
    """The outcomes of a job whose worker died each time it ran it."""
    cfg_dicts, _graph = job
    return [
        RunOutcome(
            _label(config.from_dict(d)),
            "failed",
            f"{why}; the sweep run again resumes it from its checkpoint",
        )
        for d in cfg_dicts
    ]


def _job_name(job: tuple[Any, ...]) -> str:
    """A job's runs, for a line: the run, or a stack's first run and how many more."""
    cfg_dicts, _graph = job
    first = _label(config.from_dict(cfg_dicts[0]))
    return (
        first
        if len(cfg_dicts) == 1
        else f"{first} and {len(cfg_dicts) - 1} more run(s) of its stack"
    )


def run_many(
    configs: Iterable[TrainConfig],
    *,
    workers: int = 0,
    stack: int = 1,
    graph: bool = False,
    on_done: Callable[[RunOutcome, int, int], None] | None = None,
    say: Callable[[str], None] | None = None,
    died: Callable[[str], None] | None = None,
) -> list[RunOutcome]:
    """Train every config; ``workers`` parallel processes (0 = :func:`default_workers`; 1 = in this
    process, threads as configured), each taking one job at a time: a run, or a stack of at most
    ``stack`` runs of one kind (``graph``: CUDA-graphed steps). A worker that dies costs its job
    only (:func:`in_processes`: started again once, then ``failed``); ``died`` hears of each death,
    ``say`` gets what the workers write to stderr.
    Returns one outcome per config, in completion order."""
    from creditaudit.jobs.packing import pack

    configs = [config.checked(c) for c in configs]
    outcomes: list[RunOutcome] = []
    jobs = [([config.to_dict(cfg) for cfg in job], graph) for job in pack(configs, stack)]
    for done in in_processes(
        _train_job, jobs, workers=workers, lost=_lost_job, name=_job_name, say=say, died=died
    ):
        for outcome in done:
            outcomes.append(outcome)
            if on_done:
                on_done(outcome, len(outcomes), len(configs))
    return outcomes
