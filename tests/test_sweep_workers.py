"""How many worker processes a sweep starts by default (min(cores, what memory holds)), and the
counting model of bench/bench_study.py against what a run really does."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from creditaudit.jobs import processes
from creditaudit.jobs.processes import (
    RUN_MEMORY_BYTES,
    available_memory,
    default_workers,
    in_processes,
)
from creditaudit.runs.folder import RunFolder, run_dir
from creditaudit.training.run import build_run
from creditaudit.training.trainer import train
from tests.conftest import tiny_config

GiB = 2**30


@pytest.mark.parametrize(
    "cores, available, per_run, expected",
    [
        (8, 64 * GiB, 2 * GiB, 8),  # cores bind
        (8, 5 * GiB, 2 * GiB, 2),  # memory binds: floor(5 / 2)
        (8, 1 * GiB, 2 * GiB, 1),  # never fewer than one
        (2, 0, 2 * GiB, 1),
        (16, 16 * GiB, 1 * GiB, 16),
    ],
)
def test_default_workers_is_min_of_cores_and_memory(cores, available, per_run, expected):
    assert default_workers(per_run, cores=cores, available=available) == expected


def test_default_workers_without_memory_figure_is_one_per_core(monkeypatch):
    monkeypatch.setattr(processes, "available_memory", lambda: None)
    assert default_workers(cores=3) == 3


@pytest.mark.parametrize(
    "cpu_count, available_runs, expected",
    [
        (8, 3.5, 3),  # memory for 3 runs binds
        (2, 10.0, 2),  # the cores bind
        (4, 0.5, 1),  # memory for none: still one worker
        (None, 10.0, 1),  # cpu_count unknown: one core
        (6, None, 6),  # memory unknown: one per core
    ],
)
def test_default_workers_reads_the_machines_cores_and_available_memory(
    monkeypatch, cpu_count, available_runs, expected
):
    """Without arguments the count comes from os.cpu_count() and available_memory() (given here in
    runs' worth of RUN_MEMORY_BYTES)."""
    monkeypatch.setattr(processes.os, "cpu_count", lambda: cpu_count)
    available = None if available_runs is None else int(available_runs * RUN_MEMORY_BYTES)
    monkeypatch.setattr(processes, "available_memory", lambda: available)
    assert default_workers() == expected


def test_default_workers_on_this_machine_is_between_one_and_its_core_count():
    import os

    mem = available_memory()
    assert mem is None or mem > 0
    assert 1 <= default_workers() <= (os.cpu_count() or 1)


def test_available_memory_reads_meminfo(monkeypatch, tmp_path):
    fake = tmp_path / "meminfo"
    fake.write_text(
        "MemTotal:       16000000 kB\nMemFree:         1000000 kB\nMemAvailable:    6291456 kB\n"
    )
    real_open = open
    monkeypatch.setattr(
        "builtins.open", lambda p, *a, **k: real_open(fake if p == "/proc/meminfo" else p, *a, **k)
    )
    assert available_memory() == 6291456 * 1024


def test_workers_zero_takes_the_default(monkeypatch):
    """workers=0 asks default_workers: 1 runs the jobs here, threads as configured (0)."""
    monkeypatch.setattr(processes, "default_workers", lambda *a, **k: 1)
    assert list(in_processes(lambda job, threads: (job, threads), [(1,), (2,)], workers=0)) == [
        (1, 0),
        (2, 0),
    ]


# ---------------------------------------------------------------------------------------------
# bench/bench_study.py counts what a run does: steps, evaluations, probes, checkpoints
# ---------------------------------------------------------------------------------------------
def _bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_study.py"
    spec = importlib.util.spec_from_file_location("bench_study", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_bench_counts_match_a_real_run(tmp_path):
    bench = _bench()
    cfg = tiny_config(tmp_path, "rule=dfa", "epochs=3", "full_every=2", "save_epochs=1")
    n = bench.counts(cfg)
    train(cfg)
    folder = RunFolder(run_dir(cfg.results, cfg.setting, cfg.rule, cfg.arch, cfg.seed))
    records = folder.read_metrics()
    full = [r for r in records if "credit/rho_deep" in r]
    cheap = [r for r in records if "diag/d1" in r and "credit/rho_deep" not in r]
    assert (
        (n["full"], n["cheap"]) == (len(full), len(cheap)) == (3, 1)
    )  # epochs 0, 2, 3 full; 1 cheap
    assert n["evals"] == len([r for r in records if "test/acc" in r]) == 3
    assert n["steps"] == 3 * len(build_run(cfg).loader) == 3 * math.ceil(1437 / 64)
    assert n["ckpts"] == 3 + 1  # the last checkpoint every epoch, epoch 1's kept
    assert bench.split_sizes(cfg.data) == (1437, 360)


def test_bench_synthetic_data_has_the_profiles_shapes(monkeypatch):
    from creditaudit.data.base import DATASETS
    from creditaudit.experiments import expand

    # the bench registers its synthetic datasets: here, in a copy of the registry that other tests never see
    monkeypatch.setattr(DATASETS, "_entries", dict(DATASETS._entries))
    bench = _bench()
    for profile, shape, sizes in (
        ("cpu", (1, 28, 28), (20000, 10000)),
        ("smoke", (1, 8, 8), (1437, 360)),
    ):
        cfg = expand("no_residual", profile=profile)[0]
        assert bench.split_sizes(cfg.data) == sizes
        if profile == "smoke":
            data = bench.synthetic_dataset(cfg)
            assert data.input_shape == shape and (len(data.y_train), len(data.y_test)) == sizes
    paper = expand("no_residual", profile="paper")[0]
    assert bench.shape_of(paper.data).input_shape == (3, 32, 32) and bench.split_sizes(
        paper.data
    ) == (50000, 10000)


def test_bench_schedule_is_the_makespan_of_list_scheduling_in_the_given_order():
    bench = _bench()
    assert bench.schedule([3, 3, 2, 2, 2], 2, 0) == 7  # in order: [3,2,2] and [3,2]
    assert bench.schedule(sorted([2, 2, 2, 3, 3], reverse=True), 2, 1) == 8
    assert bench.schedule([5], 4, 1) == 6


def test_bench_walls_are_sweep_order_and_longest_first_makespans_with_start_up():
    bench = _bench()
    sweep_order, lpt = bench.walls(
        [1, 1, 4], 2, 2, 1
    )  # workers free at 2; in order: [1,4] [1] -> 7; LPT: [4] [1,1] -> 6; + parent 1
    assert (sweep_order, lpt) == (8, 7)
    assert bench.walls([1, 1, 1, 1, 4], 2, 0, 0) == (6, 4)
