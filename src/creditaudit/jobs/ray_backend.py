"""Run many training runs on a Ray cluster, one job per task (docs/science.md §8): a run, or a stack
of runs of one kind (``--stack N``, ``jobs/packing.py``).

The results folder is the meeting point: every task calls the same
:func:`creditaudit.training.trainer.train` as the local backend, in the run's own folder, so a finished
run is skipped, a killed one resumes (Ray retries a task whose worker died, and the retry resumes
from the last checkpoint — after a lost node, once the dead node's lock lease has run out:
:func:`_train_job_on_a_cluster`), a folder another sweep is training is refused by its lock and
reported as ``locked``, and a run that fails or diverges is recorded while the other tasks go on.

What a cluster needs: creditaudit importable on every node (the same version), and the results
folder on a file system every node sees at the same path. Paths in the configs are made absolute
here, before dispatch, so that a task does not depend on the worker's working directory. Datasets
are read on each node from its ``data_dir`` (``$CREDITAUDIT_DATA_DIR`` or the per-user cache when
the config leaves it empty).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

from creditaudit import config
from creditaudit.config import TrainConfig
from creditaudit.errors import ConfigError
from creditaudit.jobs.processes import RunOutcome, _label, _train_job

#: Ray retries a task whose worker process died (OOM kill, node lost); the retry resumes the run.
MAX_RETRIES = 2
#: after a lost node, how long past its lock's lease a task waits before its one more attempt
LEASE_MARGIN_S = 5.0


def _train_job_on_a_cluster(cfg_dicts: list[dict], graph: bool, threads: int) -> list[RunOutcome]:
    """:func:`~creditaudit.jobs.processes._train_job`, and one more attempt for the runs refused
    by a lock only its lease can vouch for (a holder on another node). When a node is lost, Ray
    retries its task on another node while the dead node's lease still runs; the retry waits for
    the lease to run out (at most one lease, default 5 min: ``$CREDITAUDIT_LOCK_LEASE_S``), then
    takes the run over and resumes it. A live holder keeps renewing its lease, and the run is then
    reported ``locked`` after that wait."""
    from creditaudit.runs.lock import lease_left

    outcomes = _train_job(cfg_dicts, graph, threads)
    left = {
        i: lease_left(config.run_path(config.from_dict(d)) / "run.lock")
        for i, (d, o) in enumerate(zip(cfg_dicts, outcomes, strict=True))
        if o.status == "locked"
    }
    waits = {i: w for i, w in left.items() if w is not None}
    if not waits:
        return outcomes
    time.sleep(max(waits.values()) + LEASE_MARGIN_S)
    again = iter(_train_job([cfg_dicts[i] for i in sorted(waits)], graph, threads))
    return [next(again) if i in waits else o for i, o in enumerate(outcomes)]


def _import_ray():
    try:
        import ray
    except ImportError as exc:  # an optional dependency: say how to get it
        raise ConfigError(
            "the ray backend needs Ray: pip install 'creditaudit[ray]' (or use --backend local)"
        ) from exc
    return ray


def portable(cfg: TrainConfig) -> TrainConfig:
    """A copy of ``cfg`` whose file paths are absolute, so it means the same on any worker (rule
    files are recorded by absolute path already: :func:`config.checked`)."""
    cfg = config.copy_config(cfg)
    cfg.results = os.path.abspath(cfg.results)
    if cfg.data.data_dir:
        cfg.data.data_dir = os.path.abspath(cfg.data.data_dir)
    return cfg


def connect(
    address: str | None = None, *, num_cpus: int | None = None, temp_dir: str | None = None
) -> bool:
    """Make sure this process is connected to Ray. Returns True when it started the connection
    (and so should shut it down), False when one was already open.

    ``address`` names an existing cluster (``auto``, ``host:port`` or ``ray://host:port``); with none,
    ``$RAY_ADDRESS`` is used if set, else a local Ray instance is started with ``num_cpus`` CPUs
    and no dashboard.
    """
    ray = _import_ray()
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"log_to_driver": False}
    if address is None:  # a local instance of our own: its size, its files, no dashboard
        kwargs.update(include_dashboard=False, num_cpus=num_cpus or None)
        if temp_dir:
            kwargs["_temp_dir"] = temp_dir
    else:
        _check_reachable(address)
    try:
        ray.init(address=address, **kwargs)
    except ConnectionError as exc:
        raise ConfigError(
            f"could not connect to the Ray cluster at {address!r}: {exc}; "
            "start one with `ray start --head`, or drop --address to run a local Ray"
        ) from exc
    return True


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail fast on a ``host:port`` nobody listens on: Ray itself retries such an address for
    minutes before it gives up."""
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and the like: Ray resolves them
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConfigError(
            f"could not connect to the Ray cluster at {address!r} ({exc.strerror or exc}); "
            "start one with `ray start --head`, or drop --address to run a local Ray"
        ) from exc


def run_many_ray(
    configs: Iterable[TrainConfig],
    *,
    address: str | None = None,
    num_cpus: int | None = None,
    gpus_per_run: float = 0.0,
    stack: int = 1,
    graph: bool = False,
    temp_dir: str | None = None,
    on_done: Callable[[RunOutcome, int, int], None] | None = None,
) -> list[RunOutcome]:
    """Train every config in Ray tasks of one job each (one CPU, ``gpus_per_run`` GPUs, one torch
    thread): a run, or a stack of at most ``stack`` runs of one kind. Returns one outcome per
    config, in completion order; never raises for a run's failure."""
    from creditaudit.jobs.packing import pack

    configs = [portable(config.checked(c)) for c in configs]
    if not configs:
        return []
    ray = _import_ray()
    started = connect(address, num_cpus=num_cpus, temp_dir=temp_dir)
    try:
        task = ray.remote(num_cpus=1, num_gpus=gpus_per_run, max_retries=MAX_RETRIES)(
            _train_job_on_a_cluster
        )
        pending = {
            task.remote([config.to_dict(c) for c in job], graph, 1): job
            for job in pack(configs, stack)
        }
        outcomes: list[RunOutcome] = []
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            job = pending.pop(ref)
            try:
                done = ray.get(ref)
            except Exception as exc:  # the worker died past its retries, or Ray lost the task
                done = [
                    RunOutcome(_label(cfg), "failed", f"{type(exc).__name__}: {exc}") for cfg in job
                ]
            for outcome in done:
                outcomes.append(outcome)
                if on_done:
                    on_done(outcome, len(outcomes), len(configs))
        return outcomes
    finally:
        if started:
            ray.shutdown()
