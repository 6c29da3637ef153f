"""Project the wall time of the whole study (or of some settings) on this machine, from short
measurements on synthetic data — no dataset file is read, no CIFAR-10 needed.

    python bench/bench_study.py [profile=cpu] [workers=2] [device=cpu] [steps=20] [with_baselines=0]
                                [settings=all|NAME,NAME] [warmup=3] [json=FILE] [from=FILE[,FILE]]
                                [stack=1] [graph=0] [key=value ...]

What it does:

1. Plans the runs exactly as ``creditaudit sweep SETTINGS --profile P [--with-baselines]`` does
   (``experiments.expand`` / ``experiments.baselines``, baselines first) and groups them into
   *kinds*: runs whose cost per step and per probe is the same (rule, architecture and its options,
   batch size, penalty on/off, rule options, trajectory logging, dataset shape). Seeds, epochs and
   run folders do not change what a step costs.
2. Measures every kind in ``workers`` concurrent single-thread worker processes (spawned, one thread
   each, as the sweep's) on synthetic data of the profile's shapes (paper: 3×32×32, 50,000/10,000,
   crop_flip; cpu: 1×28×28, 20,000 of 60,000 / 10,000; smoke: 1×8×8, 1,437/360). All workers time
   the same kind at the same moment (a barrier between phases), so each figure includes the
   contention of ``workers`` busy processes and is the median over the workers. Per kind:
   the data pipeline (``load_dataset`` on a synthetic raw split of the real size, gzip decoding of
   an IDX-sized payload included), ``build_run``, provenance, the first ``warmup`` steps (their
   excess over steady state is a per-run cost), ``steps`` training steps (loader included; half
   before the probes and half after them, the step time is the median of these windows over the
   workers: a burst of other load spoils one window, not the figure), one test-set evaluation,
   one cheap probe, one full probe (ρ and (c)) and one checkpoint write. ``peak RSS`` is the
   worker's peak resident set up to that kind (the allocator keeps memory of earlier kinds, as a
   sweep worker keeps that of its earlier runs).
3. Projects each run: per-run costs + epochs·⌈train/batch⌉ steps + one evaluation and one checkpoint
   per epoch (+ ``save_epochs``) + the probes ``diagnostics.due`` asks for (epoch 0 included). The
   runs are then scheduled on ``workers`` workers, after the parent's and the workers' start-up
   (both measured): in the sweep's own order (what ``creditaudit sweep`` does today: a worker takes
   the next run as it frees up) and longest-first (LPT).

Prints the measured kinds, the projection per setting, the top ten (rule, architecture) costs, the
whole study's projected wall time and each worker's peak memory (resident set; on CUDA also
``torch.cuda.max_memory_allocated``). ``json=FILE`` saves measurements and projection;
``from=FILE[,FILE...]`` re-projects saved measurements (e.g. for other settings of the same profile)
without measuring; of several files, per kind and figure the smallest (the least disturbed by other
load on a shared machine). Other ``key=value`` items go to every run, as ``creditaudit sweep``'s do (``epochs=1``).

``stack=N`` (``graph=1``) projects ``creditaudit sweep --stack N [--graph]``: the runs are packed
into jobs as the sweep packs them (``jobs/packing.py``), and each (kind, stack size) that occurs is
measured as a stack — its step, its evaluation and its probes for all the stack's runs at once
(each run's ρ_l its own), its checkpoints per run — by every worker at once. A job's time is then
its stack's; a run's share of
it is the job's time over its size. See docs/performance.md.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from creditaudit import config
from creditaudit.config import TrainConfig
from creditaudit.data.base import DATASETS, DataConfig, TensorDataset
from creditaudit.data.pipeline import load_dataset
from creditaudit.diagnostics import due
from creditaudit.training.run import train_step

# ---------------------------------------------------------------------------------------------
# Synthetic data of the study's shapes
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shape:
    input_shape: tuple[int, ...]
    classes: int
    n_train: int  # the raw split, before train_subset
    n_test: int
    augment: str  # the dataset's default ("auto")
    gz: bool = False  # read from gzip'd files (IDX): decoding is part of loading


SHAPES = {
    "fashion_mnist": Shape((1, 28, 28), 10, 60000, 10000, "none", gz=True),
    "mnist": Shape((1, 28, 28), 10, 60000, 10000, "none", gz=True),
    "cifar10": Shape((3, 32, 32), 10, 50000, 10000, "crop_flip"),
    "digits": Shape((1, 8, 8), 10, 1437, 360, "none"),
    "mnist1d": Shape((40,), 10, 4000, 1000, "none"),
}


def shape_of(data: DataConfig) -> Shape:
    if data.dataset == "student":
        return Shape(
            (data.student_dim,), data.student_classes, data.student_train, data.student_test, "none"
        )
    if data.dataset == "mnist1d":  # the generator's 80/20 split of data.mnist1d_signals
        n_test = data.mnist1d_signals - int(0.8 * data.mnist1d_signals)
        return dataclasses.replace(
            SHAPES["mnist1d"], n_train=data.mnist1d_signals - n_test, n_test=n_test
        )
    return SHAPES[data.dataset]


def split_sizes(data: DataConfig) -> tuple[int, int]:
    s = shape_of(data)
    return (data.train_subset or s.n_train), (data.test_subset or s.n_test)


_GZ_PAYLOAD: dict[int, bytes] = {}


def _synthetic_raw(shape: Shape):
    """A raw loader for ``load_dataset``: uint8 pixels turned into float32 the way the real loaders
    do, after decoding a gzip payload of the same size for gzip'd datasets (pixels half zeros, as
    in MNIST-like images, so it compresses like them)."""

    def load(cfg: DataConfig, data_dir: str, seed: int) -> TensorDataset:
        g = torch.Generator().manual_seed(0)
        splits = []
        for n in (shape.n_train, shape.n_test):
            numel = n * math.prod(shape.input_shape)
            if shape.gz:
                if numel not in _GZ_PAYLOAD:  # compressed once per process, outside what is timed
                    rng = np.random.default_rng(0)
                    raw = rng.integers(0, 256, numel, dtype=np.uint8)
                    raw[rng.random(numel) < 0.5] = 0
                    _GZ_PAYLOAD[numel] = gzip.compress(raw.tobytes(), compresslevel=1)
                pixels = np.frombuffer(gzip.decompress(_GZ_PAYLOAD[numel]), dtype=np.uint8).reshape(
                    n, *shape.input_shape
                )
                x = torch.from_numpy(pixels.copy()).float().div_(255.0)
            else:
                x = (
                    torch.randint(0, 256, (n, *shape.input_shape), generator=g, dtype=torch.uint8)
                    .float()
                    .div_(255.0)
                )
            y = torch.randint(0, shape.classes, (n,), generator=g)
            splits.append((x, y))
        return TensorDataset(
            "synthetic",
            splits[0][0],
            splits[0][1],
            splits[1][0],
            splits[1][1],
            shape.classes,
            shape.input_shape,
            shape.augment,
        )

    return load


def synthetic_dataset(cfg: TrainConfig) -> TensorDataset:
    """``load_dataset`` (subsets, random labels, normalisation) on a synthetic raw split of the
    shapes of ``cfg.data``'s dataset."""
    name = f"bench_{cfg.data.dataset}"
    if name not in DATASETS:
        DATASETS.add(name, _synthetic_raw(shape_of(cfg.data)), "synthetic (bench)")
    return load_dataset(dataclasses.replace(cfg.data, dataset=name), cfg.seed)


# ---------------------------------------------------------------------------------------------
# Kinds and counts
# ---------------------------------------------------------------------------------------------
def kind_key(cfg: TrainConfig) -> str:
    """What decides the cost of a step and of a probe (not seeds, epochs, folders or penalty values)."""
    from creditaudit import typedconfig

    # without where a run runs, how it is shown and what its folder is called
    d = typedconfig.semantic_dict(cfg)
    d["eval_batch_size"] = cfg.eval_batch_size  # not semantic, but the evaluation's cost
    for k in ("seed", "epochs", "save_epochs"):
        d.pop(k)
    d["lam"] = bool(d["lam"])
    d["data"] = {
        "dataset": cfg.data.dataset,
        "sizes": split_sizes(cfg.data),
        "augment": cfg.data.augment,
    }
    d["diag"].pop("full_every")
    d["diag"].pop("every")
    return json.dumps(d, sort_keys=True)


def job_kind(job: list[TrainConfig]) -> str:
    """A job's kind: its runs' kind, and the stack size when it is a stack."""
    return kind_key(job[0]) + (f"|stack={len(job)}" if len(job) > 1 else "")


def kind_label(cfg: TrainConfig) -> str:
    m = cfg.model
    parts = [cfg.arch] + [f"{k}{v}" for k, v in (("d", m.d), ("L", m.L)) if v is not None]
    parts += [
        n
        for n, v in (
            ("noLN", m.out_ln is False),
            ("noskip", m.residual is False),
            ("pen", cfg.lam > 0),
            ("traj", cfg.diag.trajectory),
        )
        if v
    ]
    return f"{cfg.rule} {'-'.join(parts)}"


def counts(cfg: TrainConfig) -> dict[str, int]:
    """How often a run does each measured thing."""
    n_train, _ = split_sizes(cfg.data)
    steps_per_epoch = -(-n_train // cfg.batch_size)
    cheap = full = 0
    for epoch in range(cfg.epochs + 1):
        wanted, is_full = due(cfg.diag, epoch, cfg.epochs)
        if wanted:
            full += is_full
            cheap += not is_full
    extra_ckpt = len([e for e in cfg.save_epochs if 1 <= e <= cfg.epochs])
    return {
        "steps": cfg.epochs * steps_per_epoch,
        "evals": cfg.epochs,
        "cheap": cheap,
        "full": full,
        "ckpts": cfg.epochs + extra_ckpt,
    }


def plan(
    profile: str, settings: list[str], with_baselines: bool, overrides: tuple[str, ...] = ()
) -> tuple[list[TrainConfig], int]:
    """The runs ``creditaudit sweep SETTINGS [key=value ...]`` trains, in its order (baselines
    first), and how many are baselines."""
    from creditaudit.experiments import baselines, expand, study_settings

    names = study_settings() if settings == ["all"] else settings  # as `creditaudit sweep all`
    cfgs = [c for n in names for c in expand(n, profile=profile, overrides=overrides)]
    added = baselines(cfgs, profile=profile, overrides=overrides) if with_baselines else []
    return added + cfgs, len(added)


# ---------------------------------------------------------------------------------------------
# Measuring one kind in a worker
# ---------------------------------------------------------------------------------------------
_BARRIER = None


def _init_worker(barrier, threads: int, prime: list[dict], device_name: str) -> None:
    """A worker's start-up, as a sweep worker pays it in its first run: threads, then what the
    first build, step and probe load lazily (torch.optim pulls in torch._dynamo: seconds), primed
    on a tiny dataset for each config of ``prime``. Also the gzip payloads the synthetic loaders
    decode are made here, untimed."""
    global _BARRIER
    _BARRIER = barrier
    if threads:
        torch.set_num_threads(threads)
    from creditaudit.training.allocator import keep_freed_memory
    from creditaudit.training.run import build_run, diagnose, resolve_device

    keep_freed_memory()  # as train() does in a sweep worker

    device = resolve_device(device_name)
    for cfg_dict in prime:
        cfg = config.from_dict(cfg_dict)
        config.load_plugins(cfg)
        cfg = config.resolve_rule_options(cfg)
        shape = shape_of(cfg.data)
        if shape.gz:
            _synthetic_raw(shape)(cfg.data, "", 0)  # fills _GZ_PAYLOAD
        tiny = TensorDataset(
            "prime",
            torch.randn(64, *shape.input_shape),
            torch.randint(0, shape.classes, (64,)),
            torch.randn(64, *shape.input_shape),
            torch.randint(0, shape.classes, (64,)),
            shape.classes,
            shape.input_shape,
            shape.augment,
        )
        run = build_run(cfg, device=device, data=tiny)
        x, y = next(iter(run.loader.epoch(0)))
        train_step(run, x, y)
        diagnose(run, full=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak_rss() -> bool:
    try:  # Linux: "5" resets VmHWM, the peak resident set, so each kind gets its own peak
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_kind(
    cfg_dict: dict,
    steps: int,
    warmup: int,
    device_name: str,
    start_wall: float,
    size: int = 1,
    graph: bool = False,
) -> dict[str, Any]:
    """Time one kind's pieces (see the module docstring); ``size`` > 1: as a stack of that many
    runs (``graph``: CUDA-graphed). Every worker passes the same barriers (before each timed
    phase) whatever happens, so a failure never blocks the others."""
    from creditaudit.runs.checkpoint import save_checkpoint
    from creditaudit.runs.provenance import provenance
    from creditaudit.training.run import (
        build_run,
        diagnose,
        evaluate,
        resolve_device,
        run_state,
    )

    started = time.time()
    out: dict[str, Any] = {
        "pid": os.getpid(),
        "started": started,
        "since_pool": started - start_wall,
    }
    per_kind_peak = _reset_peak_rss()
    device = resolve_device(device_name)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    state: dict[str, Any] = {}

    def setup() -> None:
        cfg = config.from_dict(cfg_dict)
        config.load_plugins(cfg)
        cfg = config.resolve_rule_options(cfg)
        t0 = time.perf_counter()
        data = synthetic_dataset(cfg)
        out["load_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        run = build_run(cfg, device=device, data=data)
        _sync(device)
        out["build_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        provenance(device)
        out["provenance_s"] = time.perf_counter() - t0
        state["run"] = run
        if size > 1:
            from creditaudit.training.stack import Stack

            runs = [run] + [
                build_run(dataclasses.replace(cfg, seed=cfg.seed + i), device=device, data=run.data)
                for i in range(1, size)
            ]
            state["stack"] = Stack(runs, graph=graph)
            state["batches"] = _stacked_batches(runs)
        else:
            state["batches"] = _batches(run)
        t0 = time.perf_counter()
        for _ in range(warmup):
            _step(run, state)
        _sync(device)
        out["warmup_s"] = time.perf_counter() - t0

    def train_steps() -> None:  # half the steps now, half after the probes: two moments of the load
        run, n = state["run"], max(1, steps // 2)
        t0 = time.perf_counter()
        for _ in range(n):
            _step(run, state)
        _sync(device)
        out.setdefault("step_windows_s", []).append((time.perf_counter() - t0) / n)

    def evaluation() -> None:
        run = state["run"]
        t0 = time.perf_counter()
        if "stack" in state:  # every run of the stack at once
            state["stack"].evaluate(run.data.x_test, run.data.y_test, run.cfg.eval_batch_size)
        else:
            evaluate(run.model, run.data.x_test, run.data.y_test, run.cfg.eval_batch_size)
        _sync(device)
        out["eval_s"] = time.perf_counter() - t0

    def probe(full: bool):
        def go() -> None:
            t0 = time.perf_counter()
            if "stack" in state:  # every run of the stack at once, then each run's own part
                from creditaudit.training.stack import finish_probe

                stack, diag = state["stack"], state["run"].cfg.diag
                for r, (figures, rho) in zip(
                    stack.runs, stack.probe(list(range(len(stack))), diag, full=full), strict=True
                ):
                    finish_probe(r, figures, rho, diag, full=full)
            else:
                diagnose(state["run"], full=full)
            _sync(device)
            out["full_s" if full else "cheap_s"] = time.perf_counter() - t0

        return go

    def checkpoint() -> None:
        run = state["run"]
        with tempfile.TemporaryDirectory(prefix="bench_study_") as tmp:
            t0 = time.perf_counter()
            save_checkpoint(
                os.path.join(tmp, "last.safetensors"),
                run_state(run),
                {"epoch": 1, "step": run.step, "wall_s": 0.0},
            )
            out["ckpt_s"] = time.perf_counter() - t0

    for phase in (
        setup,
        train_steps,
        evaluation,
        probe(False),
        probe(True),
        train_steps,
        checkpoint,
    ):
        try:
            _BARRIER.wait(timeout=3600)
        except Exception as exc:  # a broken barrier: time alone rather than hang
            out.setdefault("warning", f"barrier: {type(exc).__name__}")
        if "error" in out:
            continue
        try:
            phase()
        except Exception as exc:
            out["error"] = f"{phase.__name__}: {type(exc).__name__}: {exc}"
    state.clear()
    out["peak_rss_mib"] = _peak_rss_mib()
    out["peak_rss_is_per_kind"] = per_kind_peak
    out["worker_max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def _batches(run):
    """Training batches as the trainer draws them, epoch after epoch."""
    epoch = 0
    while True:
        yield from run.loader.epoch(epoch)
        epoch += 1


def _stacked_batches(runs):
    """A stack's batches, (R, B, ...), epoch after epoch."""
    from creditaudit.data.loader import stacked_epoch

    epoch = 0
    while True:
        yield from stacked_epoch([r.loader for r in runs], epoch)
        epoch += 1


def _step(run, state: dict) -> None:
    # train_epoch's body: a step plus its on-device accumulation of the epoch's metrics
    x, y = next(state["batches"])
    if "stack" in state:  # Stack.train_epoch's body (it accumulates on the device itself)
        state["stack"].train_step(x, y)
        return
    loss, _correct, rule_metrics = train_step(run, x, y)
    state["loss"] = state.get("loss", 0.0) + loss
    for k, v in rule_metrics.items():
        state[k] = state.get(k, 0.0) + v.detach()


def measure(
    kinds: dict[str, tuple[TrainConfig, int]],
    *,
    workers: int,
    steps: int,
    warmup: int,
    device: str,
    graph: bool = False,
    on_kind=None,
) -> tuple[dict[str, dict], list[dict], float]:
    """Every kind (a config and its stack size) measured by all ``workers`` at once; returns
    (kind -> median figures, raw records, the workers' start-up: seconds from the pool's creation
    to a worker's first job)."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(workers)
    threads = (
        1 if workers > 1 else 0
    )  # as sweep.processes: one thread per worker; alone, torch's default
    pool_start = time.time()
    records: list[dict] = []
    medians: dict[str, dict] = {}
    first = next(iter(kinds.values()))[0]
    prime = [config.to_dict(first)] + [
        config.to_dict(c)
        for c in {c.data.dataset: c for c, _ in kinds.values()}.values()
        if c.data.dataset != first.data.dataset
    ]
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(barrier, threads, prime, device),
    ) as pool:
        futures = {
            key: [
                pool.submit(
                    measure_kind,
                    config.to_dict(cfg),
                    steps,
                    warmup,
                    device,
                    pool_start,
                    size,
                    graph,
                )
                for _ in range(workers)
            ]
            for key, (cfg, size) in kinds.items()
        }  # kind-major: the `workers` copies of a kind run together
        for key, futs in futures.items():
            recs = [f.result() for f in futs]
            for r in recs:
                r["kind"] = key
            records += recs
            errors = [r["error"] for r in recs if "error" in r]
            if errors:
                medians[key] = {"error": errors[0]}
            else:
                medians[key] = {
                    k: statistics.median(r[k] for r in recs)
                    for k in (
                        "load_s",
                        "build_s",
                        "provenance_s",
                        "warmup_s",
                        "eval_s",
                        "cheap_s",
                        "full_s",
                        "ckpt_s",
                        "peak_rss_mib",
                    )
                }
                medians[key]["step_s"] = statistics.median(
                    w for r in recs for w in r["step_windows_s"]
                )
                if "cuda_peak_mib" in recs[0]:
                    medians[key]["cuda_peak_mib"] = max(r["cuda_peak_mib"] for r in recs)
            if on_kind:
                on_kind(key, medians[key])
    first_job = defaultdict(lambda: math.inf)
    for r in records:
        first_job[r["pid"]] = min(first_job[r["pid"]], r["since_pool"])
    startup = statistics.median(first_job.values()) if first_job else 0.0
    return medians, records, startup


# ---------------------------------------------------------------------------------------------
# Projection
# ---------------------------------------------------------------------------------------------
def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "rule_opts":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def match_kinds(keys: set[str], medians: dict[str, dict]) -> dict[str, dict]:
    """Each kind's measurement; for saved ones (``from=``) written when the config had other
    fields, the one that agrees on every field both know (and on the stack size)."""
    out = {}
    saved = [(json.loads(k.partition("|")[0]), k.partition("|")[2], m) for k, m in medians.items()]
    for key in keys:
        if key in medians:
            out[key] = medians[key]
            continue
        cfg_part, _, size = key.partition("|")
        want = _flat(json.loads(cfg_part))
        for k, k_size, m in saved:
            have = _flat(k)
            if k_size == size and all(want[f] == v for f, v in have.items() if f in want):
                out[key] = m
                break
    return out


def job_seconds(job: list[TrainConfig], m: dict, warmup: int) -> dict[str, float]:
    """A job's projected seconds, by part: one run, or a stack of len(job) runs (whose step and
    evaluation and probes ``m`` measured for all of them at once; loading, building and
    checkpoints are each run's own)."""
    cfg, size = job[0], len(job)
    n = counts(cfg)
    excess = max(0.0, m["warmup_s"] - warmup * m["step_s"])
    parts = {
        "start": size * (m["load_s"] + m["build_s"] + m["provenance_s"]) + excess,
        "steps": n["steps"] * m["step_s"],
        "eval": n["evals"] * m["eval_s"],
        # a stack's probes are taken together (``m`` measured them for the whole stack), runs alone
        "probes": (
            n["cheap"] * m["cheap_s"] + n["full"] * m["full_s"]
            if size > 1
            else sum(
                counts(c)["cheap"] * m["cheap_s"] + counts(c)["full"] * m["full_s"] for c in job
            )
        ),
        "ckpt": sum(counts(c)["ckpts"] for c in job) * m["ckpt_s"],
    }
    parts["total"] = sum(parts.values())
    return parts


def schedule(durations: list[float], workers: int, start: float) -> float:
    """Makespan of list scheduling: each job, in the given order, goes to the first free worker."""
    free = [start] * max(1, min(workers, len(durations)))
    for d in durations:
        i = min(range(len(free)), key=free.__getitem__)
        free[i] += d
    return max(free) if durations else 0.0


def walls(
    durations: list[float], workers: int, worker_start: float, parent_start: float
) -> tuple[float, float]:
    """(sweep order, longest first) wall time, the parent's and the workers' start-up included.
    One run, or one worker: the sweep trains in its own process (no worker start-up)."""
    ws = 0.0 if workers == 1 or len(durations) <= 1 else worker_start
    return (
        parent_start + schedule(durations, workers, ws),
        parent_start + schedule(sorted(durations, reverse=True), workers, ws),
    )


def fmt_s(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.2f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


def _parent_start_s() -> float:
    """Seconds since this process started (interpreter, imports, planning): the sweep's own start-up."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def report(
    jobs: list[list[TrainConfig]],
    n_baselines: int,
    medians: dict[str, dict],
    *,
    workers: int,
    warmup: int,
    worker_start: float,
    parent_start: float,
) -> dict[str, Any]:
    from creditaudit.experiments import SETTINGS  # noqa: F401  (registry loaded)

    keys = [job_kind(j) for j in jobs]
    medians = match_kinds(set(keys), medians)
    bad = {k for k in set(keys) if "error" in medians.get(k, {"error": "not measured"})}
    for k in bad:
        print(
            f"  NOT MEASURED: {kind_label(jobs[keys.index(k)][0])}: {medians.get(k, {}).get('error', 'not measured')}"
        )
    per_job = [
        job_seconds(j, medians[k], warmup) if k not in bad else None
        for j, k in zip(jobs, keys, strict=True)
    ]
    ok_jobs = [(j, p) for j, p in zip(jobs, per_job, strict=True) if p is not None]
    # each run's share of its job
    ok = [(c, {k: v / len(j) for k, v in p.items()}) for j, p in ok_jobs for c in j]
    durations = [p["total"] for _, p in ok_jobs]
    stacked = sum(len(j) for j, _ in ok_jobs if len(j) > 1)

    print(
        f"\nprojection per setting ({workers} worker(s); 'alone' = `creditaudit sweep "
        "SETTING` by itself, start-ups included;"
        f" a stacked run counts its share of its stack)"
    )
    print(
        f"  {'setting':<22}{'runs':>5}{'epochs':>7}{'worker time':>13}{'alone, sweep order':>20}{'alone, LPT':>12}"
    )
    by_setting: dict[str, list[float]] = defaultdict(list)
    epochs: dict[str, int] = {}
    for c, p in ok:
        by_setting[c.setting].append(p["total"])
        epochs[c.setting] = c.epochs
    settings_out = {}
    for s, ds in by_setting.items():
        w_sweep, w_lpt = walls(ds, workers, worker_start, parent_start)
        settings_out[s] = {
            "runs": len(ds),
            "worker_s": sum(ds),
            "wall_sweep_order_s": w_sweep,
            "wall_lpt_s": w_lpt,
        }
        print(
            f"  {s:<22}{len(ds):>5}{epochs[s]:>7}{fmt_s(sum(ds)):>13}{fmt_s(w_sweep):>20}{fmt_s(w_lpt):>12}"
        )

    print("\ntop ten (rule, architecture) costs, summed over their runs")
    by_pair: dict[str, list[float]] = defaultdict(list)
    parts_sum: dict[str, float] = defaultdict(float)
    for c, p in ok:
        by_pair[kind_label(c)].append(p["total"])
        for k, v in p.items():
            if k != "total":
                parts_sum[k] += v
    total = sum(p["total"] for _, p in ok)
    top = sorted(by_pair.items(), key=lambda kv: -sum(kv[1]))[:10]
    print(f"  {'rule architecture':<34}{'runs':>5}{'per run':>11}{'total':>11}{'share':>8}")
    for label, ds in top:
        print(
            f"  {label:<34}{len(ds):>5}{fmt_s(statistics.mean(ds)):>11}{fmt_s(sum(ds)):>11}{sum(ds) / total:>8.1%}"
        )

    # the sweep's order is the packing's (longest job first) when it stacks; else the plan's
    w_sweep, w_lpt = walls(durations, workers, worker_start, parent_start)
    print(
        f"\nwhole plan: {len(ok)} runs ({n_baselines} baselines) in {len(ok_jobs)} jobs ({stacked} runs in stacks), "
        f"{fmt_s(total)} of worker time ({', '.join(f'{k} {v / total:.0%}' for k, v in parts_sum.items())})"
    )
    print(f"  start-up: parent {parent_start:.1f} s, workers {worker_start:.1f} s")
    print(
        f"  projected wall time on {workers} worker(s): {fmt_s(w_sweep)} in the sweep's "
        f"order, {fmt_s(w_lpt)} longest-first (LPT);"
        f" lower bound {fmt_s(total / workers)}"
    )
    return {
        "settings": settings_out,
        "total_worker_s": total,
        "wall_sweep_order_s": w_sweep,
        "wall_lpt_s": w_lpt,
        "parts_s": dict(parts_sum),
        "top10": [(l, len(d), sum(d)) for l, d in top],
        "runs": [{"run": f"{c.setting}/{config.run_path(c).name}", **p} for c, p in ok],
    }


def load_measurements(paths: list[str]) -> tuple[dict, float, float, list, int, int]:
    """Saved measurements (``json=``); of several files, for every kind and figure the smallest:
    on a shared machine other load only ever adds time, so the least disturbed of repeated bench
    runs is the machine's own figure (files of one profile, device and worker count)."""
    saved = [json.loads(Path(p).read_text()) for p in paths]
    first = saved[0]
    for p, s in zip(paths, saved, strict=True):
        what = ("profile", "device", "workers", "warmup")
        if any(s[k] != first[k] for k in what):
            sys.exit(
                f"{p}: measured with {', '.join(f'{k} {s[k]}' for k in what)}; {paths[0]}: "
                f"{', '.join(f'{k} {first[k]}' for k in what)} — combine like with like"
            )
    medians: dict[str, dict] = {}
    for s in saved:
        for key, m in s["medians"].items():
            old = medians.get(key)
            if old is None or "error" in old:
                medians[key] = dict(m)
            elif "error" not in m:
                medians[key] = {
                    k: min(v, m.get(k, v)) if k != "peak_rss_mib" else max(v, m.get(k, v))
                    for k, v in old.items()
                }
    print(
        f"measurements from {', '.join(paths)} ({first['workers']} workers, {first['device']}"
        + ("; per kind and figure the smallest" if len(paths) > 1 else "")
        + ")"
    )
    return (
        medians,
        min(s["worker_start_s"] for s in saved),
        min(s["parent_start_s"] for s in saved),
        [r for s in saved for r in s.get("records", [])],
        first["workers"],
        first["warmup"],
    )


# ---------------------------------------------------------------------------------------------
def main(argv: list[str]) -> None:
    from creditaudit.jobs.packing import pack
    from creditaudit.jobs.processes import default_workers
    from creditaudit.training.allocator import available_memory

    own = {
        "profile",
        "workers",
        "device",
        "steps",
        "warmup",
        "with_baselines",
        "settings",
        "json",
        "from",
        "stack",
        "graph",
    }
    if any("=" not in a for a in argv):
        sys.exit(f"options are key=value; python {sys.argv[0]} --help")
    opts = {k: v for k, v in (a.split("=", 1) for a in argv) if k in own}
    overrides = tuple(
        a for a in argv if a.split("=", 1)[0] not in own
    )  # to every run, as `creditaudit sweep` passes them
    saved = (
        json.loads(Path(opts["from"].split(",")[0]).read_text()) if "from" in opts else {}
    )  # re-projecting: its profile, device, steps
    profile = opts.get("profile", saved.get("profile", "cpu"))
    if saved and profile != saved["profile"]:
        sys.exit(
            f"from={opts['from']} holds measurements of profile {saved['profile']}, not {profile}"
        )
    with_baselines = opts.get("with_baselines", "0").lower() in ("1", "true", "yes")
    settings = opts.get("settings", "all").split(",")
    steps, warmup = int(opts.get("steps", saved.get("steps", 20))), int(opts.get("warmup", 3))
    device = opts.get("device", saved.get("device", "cpu"))
    cfgs, n_base = plan(profile, settings, with_baselines, overrides)
    stack, graph = int(opts.get("stack", 1)), opts.get("graph", "0").lower() in ("1", "true", "yes")
    jobs = (
        pack(cfgs, stack) if stack > 1 else [[c] for c in cfgs]
    )  # --stack 1: the sweep's own order
    workers = int(opts.get("workers", 0)) or default_workers()
    kinds: dict[str, tuple[TrainConfig, int]] = {}
    for j in jobs:
        kinds.setdefault(job_kind(j), (j[0], len(j)))
    parent_start = _parent_start_s()
    avail = available_memory()
    print(
        f"bench_study: profile {profile}, settings "
        f"{','.join(settings)}{''.join(' ' + o for o in overrides)}, device {device}, "
        f"{workers} worker(s) × "
        f"{'1 thread' if workers > 1 else f'{torch.get_num_threads()} threads'}; {len(cfgs)} "
        f"runs ({n_base} baselines), "
        f"{len(kinds)} kinds; {steps} timed steps per kind after {warmup} warm-up steps"
        + (
            f"; stacks of at most {stack}{', CUDA-graphed' if graph else ''}: {len(jobs)} jobs"
            if stack > 1
            else ""
        )
    )
    print(
        (
            f"machine: {os.cpu_count()} cores, {avail / 2**30:.1f} GiB available"
            if avail
            else f"machine: {os.cpu_count()} cores"
        )
        + f"; load average {os.getloadavg()[0]:.2f} at start"
    )

    if "from" in opts:
        medians, startup, parent_start, records, workers, warmup = load_measurements(
            opts["from"].split(",")
        )
    else:
        t0 = time.perf_counter()
        print(
            f"\n  {'kind':<34}{'step ms':>8}{'eval s':>8}{'cheap s':>8}{'full s':>8}{'ckpt s':>8}{'load s':>8}"
            f"{'build s':>8}{'warm+ s':>8}{'peak RSS':>10}"
        )

        def show(key: str, m: dict) -> None:
            cfg, size = kinds[key]
            label = kind_label(cfg) + (f" ×{size}" if size > 1 else "")
            if "error" in m:
                print(f"  {label:<34}FAILED {m['error']}")
                return
            print(
                f"  {label:<34}{m['step_s'] * 1e3:>8.2f}{m['eval_s']:>8.2f}{m['cheap_s']:>8.2f}{m['full_s']:>8.2f}"
                f"{m['ckpt_s']:>8.3f}{m['load_s']:>8.2f}{m['build_s']:>8.2f}"
                f"{max(0, m['warmup_s'] - warmup * m['step_s']):>8.2f}"
                f"{m['peak_rss_mib']:>6.0f} MiB"
                + (f"  cuda {m['cuda_peak_mib']:.0f} MiB" if "cuda_peak_mib" in m else ""),
                flush=True,
            )

        medians, records, startup = measure(
            kinds,
            workers=workers,
            steps=steps,
            warmup=warmup,
            device=device,
            graph=graph,
            on_kind=show,
        )
        print(
            f"measured in {fmt_s(time.perf_counter() - t0)}; load average {os.getloadavg()[0]:.2f} at the end"
        )

    print(
        "\npeak memory per worker (resident set over all its kinds"
        + (", CUDA max allocated" if device != "cpu" else "")
        + ")"
    )
    per_worker: dict[int, dict] = {}
    for r in records:
        w = per_worker.setdefault(r["pid"], {"rss": 0.0, "cuda": 0.0})
        w["rss"] = max(w["rss"], r.get("worker_max_rss_mib", 0.0))
        w["cuda"] = max(w["cuda"], r.get("cuda_peak_mib", 0.0))
    for i, (pid, w) in enumerate(sorted(per_worker.items())):
        print(
            f"  worker {i} (pid {pid}): {w['rss']:.0f} MiB"
            + (f", CUDA {w['cuda']:.0f} MiB" if w["cuda"] else "")
        )
    projection = report(
        jobs,
        n_base,
        medians,
        workers=workers,
        warmup=warmup,
        worker_start=startup,
        parent_start=parent_start,
    )
    if "json" in opts:
        with open(opts["json"], "w") as f:
            json.dump(
                {
                    "profile": profile,
                    "device": device,
                    "workers": workers,
                    "steps": steps,
                    "warmup": warmup,
                    "stack": stack,
                    "graph": graph,
                    "worker_start_s": startup,
                    "parent_start_s": parent_start,
                    "medians": medians,
                    "records": records,
                    "projection": projection,
                },
                f,
                indent=1,
                default=str,
            )
        print(f"\nwrote {opts['json']}")


if __name__ == "__main__":
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        sys.exit(0)
    main(sys.argv[1:])
