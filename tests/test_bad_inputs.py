"""Every bad input is one line on stderr and exit status 2 — never a traceback — and writes nothing
outside the results folder.

Each case is a command line run in-process from an empty working folder whose results folder is
``results`` (some cases start from a small results folder, or break one of its files first). Where
the cause is the machine rather than the input, a fault is injected: the disk full (``fsync``
raises ENOSPC, as it does when delayed allocation finds no block), or a read-only results folder
(every write under it raises EROFS or EACCES) — by making the operating system's calls fail, since
the tests may run as root, whom file modes do not stop. For each case: exit status 2, exactly one
line on stderr naming the cause, the working folder holds nothing but the results folder, and no
file of a run already in it changed.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner

from creditaudit.cli import main
from tests.results_factory import make_run

TINY = ("dataset=digits", "epochs=1", "d=16", "L=1", "threads=1", "progress=false")
LONG = "a" * 300


# ---------------------------------------------------------------------------------------------
# What a case starts from
# ---------------------------------------------------------------------------------------------
def _study(root: Path) -> None:
    """Finished runs of the main audit (bp, its baseline, dfa; two seeds), written as the trainer writes them."""
    for seed in (42, 123):
        for rule in ("bp", "bp_frozen", "dfa"):
            make_run(root, "main_audit", rule, seed)


def _not_utf8(root: Path) -> None:
    """An earlier run of `train TINY` whose config.json is not UTF-8 text."""
    folder = root / "adhoc" / "bp__resmlp__s42"
    folder.mkdir(parents=True)
    (folder / "config.json").write_bytes(b'{"rule": "bp\xff\xfe"}')


def _only_run_not_utf8(root: Path) -> None:
    _study(root)
    for run in root.glob("main_audit/*"):
        (run / "config.json").write_bytes(b"\xff\xfe{}")


def _corrupt_summary(root: Path) -> None:
    folder = root / "adhoc" / "bp__resmlp__s42"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text("{ not json")


def _other_config(root: Path) -> None:
    make_run(root, "adhoc", "bp", 42, epochs=3)  # the same folder, another config (3 epochs, not 1)


def _results_is_a_file(root: Path) -> None:
    root.write_text("notes, not a results folder\n")


def _a_folder_at_out(root: Path) -> None:
    _study(root)
    (root / "taken").mkdir()


def _a_file_in_the_way(root: Path) -> None:
    _study(root)
    (root / "notes.txt").write_text("a file\n")


# ---------------------------------------------------------------------------------------------
# Faults of the machine
# ---------------------------------------------------------------------------------------------
def disk_full(monkeypatch, root: Path) -> None:
    """Every fsync fails with ENOSPC: nothing creditaudit writes can be made durable."""

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)


def disk_full_at_checkpoint(monkeypatch, root: Path) -> None:
    """The checkpoint after the first epoch finds the disk full, as safetensors reports it."""
    import safetensors
    import safetensors.torch

    def save_file(*args, **kwargs):
        raise safetensors.SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)"
        )

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def _refuse_writes(code: int) -> Callable:
    """Every write, file creation or new folder under the results folder fails with ``code``."""

    def fault(monkeypatch, root: Path) -> None:
        root = root.resolve()
        real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

        def refuse(path) -> None:
            if isinstance(path, (str, os.PathLike)) and Path(os.path.abspath(path)).is_relative_to(
                root
            ):
                raise OSError(code, os.strerror(code), os.fspath(path))

        def open_(file, mode="r", *args, **kwargs):
            if set(mode) & set("wax+"):
                refuse(file)
            return real_open(file, mode, *args, **kwargs)

        def os_open(path, flags, *args, **kwargs):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                refuse(path)
            return real_os_open(path, flags, *args, **kwargs)

        def mkdir(path, *args, **kwargs):
            if not os.path.isdir(path):
                refuse(path)
            return real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(os, "mkdir", mkdir)

    return fault


read_only = _refuse_writes(errno.EROFS)
no_permission = _refuse_writes(errno.EACCES)


# ---------------------------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    args: tuple[str, ...]
    says: str  # a part of the one line on stderr
    setup: Callable[[Path], None] | None = None  # given the results folder, before the command
    fault: Callable | None = None  # (monkeypatch, results folder), after the setup


CASES = [
    # numbers that are not numbers (issue 19, defect 4)
    Case("lr-inf", ("train", *TINY, "lr=inf"), "optim.lr=inf: expected a finite number"),
    Case("lam-inf", ("train", *TINY, "lam=inf"), "lam=inf: expected a finite number"),
    Case(
        "w2_std-inf", ("train", *TINY, "w2_std=inf"), "model.w2_std=inf: expected a finite number"
    ),
    Case("lr-nan", ("train", *TINY, "lr=nan"), "optim.lr"),
    Case("lr-not-a-number", ("train", *TINY, "lr=abc"), "optim.lr='abc': expected float"),
    # the disk full (defect 5)
    Case("train-disk-full", ("train", *TINY), "no space left on the device", fault=disk_full),
    Case(
        "train-disk-full-at-checkpoint",
        ("train", *TINY),
        "checkpoints/last.safetensors: no space left",
        fault=disk_full_at_checkpoint,
    ),
    Case("audit-disk-full", ("audit", "results"), "no space left on the device", _study, disk_full),
    Case(
        "tables-disk-full",
        ("tables", "results"),
        "results/_reports/tables.md: no space left",
        _study,
        disk_full,
    ),
    Case(
        "inventory-disk-full",
        ("inventory", "results"),
        "TRAINING_INVENTORY.md: no space left",
        _study,
        disk_full,
    ),
    Case(
        "export-disk-full",
        ("export", "results", "--format", "csv"),
        "runs.csv: no space left",
        _study,
        disk_full,
    ),
    # a read-only results folder, or one that is not ours
    Case("train-read-only", ("train", *TINY), "read-only", fault=read_only),
    Case("audit-read-only", ("audit", "results"), "read-only", _study, read_only),
    Case("tables-no-permission", ("tables", "results"), "permission denied", _study, no_permission),
    Case("inventory-read-only", ("inventory", "results"), "read-only", _study, read_only),
    Case("export-no-permission", ("export", "results"), "permission denied", _study, no_permission),
    # results= pointing at a file, an empty results=, --out at a folder or under a file
    Case(
        "train-results-is-a-file",
        ("train", *TINY),
        "a part of this path is a file",
        _results_is_a_file,
    ),
    Case("tables-results-is-a-file", ("tables", "results"), "that is a file", _results_is_a_file),
    Case("train-results-empty", ("train", *TINY, "results="), "results= is empty"),
    Case(
        "sweep-results-empty",
        ("sweep", "main_audit", "--profile", "smoke", "results="),
        "results= is empty",
    ),
    Case(
        "exploit-results-empty",
        ("exploit", "--profile", "smoke", "--results", ""),
        "--results: is empty",
    ),
    Case(
        "tables-out-is-a-folder",
        ("tables", "results", "--out", "results/taken"),
        "a folder, where a file belongs",
        _a_folder_at_out,
    ),
    Case(
        "inventory-out-under-a-file",
        ("inventory", "results", "--out", "results/notes.txt/inventory.md"),
        "results/notes.txt: exists already",
        _a_file_in_the_way,
    ),
    # files that are not what they should be
    Case("config-json-not-utf8", ("train", *TINY), "config.json: not UTF-8 text", _not_utf8),
    Case(
        "audit-no-readable-run",
        ("audit", "results"),
        "no readable run folders under results",
        _only_run_not_utf8,
    ),
    Case(
        "summary-json-corrupt", ("train", *TINY), "summary.json: not valid JSON", _corrupt_summary
    ),
    Case(
        "another-config-in-the-folder",
        ("train", *TINY),
        "already holds a run with a different config",
        _other_config,
    ),
    # names that cannot name a folder
    Case(
        "setting-hidden",
        ("train", *TINY, "setting=.hidden"),
        "setting='.hidden' must not start with '.'",
    ),
    Case("setting-dotdot", ("train", *TINY, "setting=.."), "must not start with '.'"),
    Case("setting-too-long", ("train", *TINY, f"setting={LONG}"), "a folder name has at most 255"),
    Case(
        "arch_label-too-long",
        ("train", *TINY, f"arch_label={LONG}"),
        "a folder name has at most 255",
    ),
    Case("setting-with-separator", ("train", *TINY, "setting=a__b"), "must not contain '__'"),
    # seeds
    Case("seed-negative", ("train", *TINY, "seed=-1"), "seed=-1: must lie in 0.."),
    Case("seed-too-large", ("train", *TINY, f"seed={2**64}"), f"seed={2**64}: must lie in 0.."),
    Case("seed-not-an-integer", ("train", *TINY, "seed=1.5"), "seed='1.5': expected int"),
    Case(
        "audit-seeds-not-integers",
        ("audit", "--seeds", "1,x", *TINY),
        "'1,x': expected comma-separated integers",
    ),
    Case("audit-seed-out-of-range", ("audit", "--seeds", "-5", *TINY), "seed -5 is outside"),
    Case(
        "audit-threshold-inf",
        ("audit", "results", "--d1", "inf"),
        "'inf': expected a finite number",
        _study,
    ),
    Case(
        "audit-threshold-nan",
        ("audit", "results", "--d3", "nan"),
        "'nan': expected a finite number",
        _study,
    ),
    Case(
        "exploit-seeds-not-integers",
        ("exploit", "--seeds", "x"),
        "expected comma-separated integers",
    ),
    # a model that cannot fit in memory
    Case("model-too-large", ("train", *TINY[:1], "d=200000", "threads=1"), "has 320,0"),
    # options out of range
    Case(
        "sweep-workers-negative",
        ("sweep", "main_audit", "--profile", "smoke", "--workers", "-3", "--dry-run"),
        "'--workers': -3 is not in the range",
    ),
    Case(
        "audit-workers-negative",
        ("audit", "--workers", "-3", *TINY),
        "'--workers': -3 is not in the range",
    ),
    Case(
        "sweep-stack-zero",
        ("sweep", "main_audit", "--stack", "0"),
        "'--stack': 0 is not in the range",
    ),
    Case(
        "tables-unknown-table",
        ("tables", "results", "--table", "nope"),
        "unknown table 'nope'",
        _study,
    ),
    Case("audit-two-results-folders", ("audit", "results", "elsewhere"), "at most one RESULTS_DIR"),
    # unknown names, bad values, bad syntax
    Case("unknown-rule", ("train", *TINY, "rule=bq"), "unknown rule 'bq'"),
    Case("unknown-arch", ("train", *TINY, "arch=resnet50"), "unknown architecture 'resnet50'"),
    Case("unknown-dataset", ("train", "dataset=imagenet"), "unknown dataset 'imagenet'"),
    Case("unknown-key", ("train", *TINY, "nonsense=1"), "unknown config key 'nonsense'"),
    Case("override-without-value", ("train", *TINY, "epochs"), "expected key=value"),
    Case("negative-epochs", ("train", *TINY, "epochs=-3"), "epochs must be >= 1"),
    Case("zero-batch-size", ("train", *TINY, "batch_size=0"), "batch_size must be >= 1"),
    Case("unknown-rule-file", ("train", *TINY, "rule=missing_rule.py"), "does not exist"),
    Case("unknown-profile", ("sweep", "main_audit", "--profile", "huge"), "unknown profile 'huge'"),
    Case(
        "inventory-plan-unknown-profile",
        ("inventory", "--plan", "--profile", "huge"),
        "unknown profile 'huge'",
    ),
    Case("unknown-setting", ("sweep", "main_audti"), "unknown setting 'main_audti'"),
    Case("audit-unknown-rule", ("audit", "--rules", "nope", *TINY), "unknown rule 'nope'"),
    Case("data-unknown-dataset", ("data", "check", "imagenet"), "unknown dataset 'imagenet'"),
    # folders that are not there
    Case("tables-no-results", ("tables", "results"), "no results folder 'results'"),
    Case("inventory-no-results", ("inventory", "results"), "no results folder 'results'"),
    Case("export-no-results", ("export", "results"), "no results folder 'results'"),
    Case("audit-no-results", ("audit", "results"), "no results folder 'results'"),
    Case("exploit-render-missing", ("exploit", "--render", "results/nope"), "no such folder"),
]


def _files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.relative_to(root).parts[0].startswith("_")
    }


def test_the_table_covers_every_kind():
    assert len(CASES) >= 30
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_a_bad_input_is_one_line_and_exit_2(case, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("CREDITAUDIT_DATA_DIR", str(tmp_path / "data"))
    results = cwd / "results"
    if case.setup:
        case.setup(results)
    before = _files(results) if results.is_dir() else {}
    if case.fault:
        case.fault(monkeypatch, results)

    result = CliRunner().invoke(main, list(case.args), catch_exceptions=False)

    monkeypatch.undo()  # the real file system again, to look at what was left
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert len(lines) == 1, result.stderr
    assert case.says in lines[0], lines[0]
    assert [p.name for p in cwd.iterdir()] in (
        [],
        ["results"],
    )  # nothing outside the results folder
    after = _files(results) if results.is_dir() else {}
    assert {
        k: v for k, v in after.items() if k in before
    } == before  # no run already there changed or went


# ---------------------------------------------------------------------------------------------
# The memory check refuses what cannot fit, and nothing of the study
# ---------------------------------------------------------------------------------------------
# (input shape, classes) of each dataset, as its loader gives them
SHAPES = {
    "cifar10": ((3, 32, 32), 10),
    "fashion_mnist": ((1, 28, 28), 10),
    "mnist": ((1, 28, 28), 10),
    "digits": ((1, 8, 8), 10),
    "mnist1d": ((40,), 10),
}


def _data(cfg) -> SimpleNamespace:
    d = cfg.data
    shape, classes = (
        ((d.student_dim,), d.student_classes) if d.dataset == "student" else SHAPES[d.dataset]
    )
    return SimpleNamespace(input_shape=shape, num_classes=classes)


def test_the_memory_check_refuses_no_configuration_of_the_studys_profiles(monkeypatch):
    """Every run of every setting (and its baselines) under every profile, and every audit profile's
    runs, passes the check on a device of 1 GiB: it can refuse only what could never train."""
    import creditaudit.training.run
    from creditaudit import experiments

    monkeypatch.setattr(creditaudit.training.run, "device_memory", lambda device: 2**30)
    cfgs = []
    for profile in experiments.profile_names(experiments.SWEEP):
        settings = [
            c for n in experiments.study_settings() for c in experiments.expand(n, profile=profile)
        ]
        cfgs += settings + experiments.baselines(settings, profile=profile)
    for profile in experiments.profile_names(experiments.AUDIT):
        cfgs += experiments.audit_configs(
            list(experiments.get_profile(profile, experiments.AUDIT).audit_rules), profile=profile
        )
    kinds = {(c.arch, str(c.model), c.data.dataset, c.data.student_dim): c for c in cfgs}
    assert len(kinds) > 10
    for cfg in kinds.values():
        creditaudit.training.run.check_fits(cfg, cfg.model, _data(cfg), torch.device("cpu"))


def test_the_memory_check_counts_before_allocating(monkeypatch):
    import creditaudit.training.run
    from creditaudit.config import TrainConfig, apply_overrides
    from creditaudit.errors import ConfigError

    monkeypatch.setattr(creditaudit.training.run, "device_memory", lambda device: 2**30)
    cfg = apply_overrides(TrainConfig(), ["d=200000"])
    with pytest.raises(
        ConfigError, match=r"resmlp with d=200000, L=4 has 320,162,600,010 parameters.*1\.0 GiB"
    ):
        creditaudit.training.run.check_fits(cfg, cfg.model, _data(cfg), torch.device("cpu"))
    creditaudit.training.run.check_fits(
        cfg, apply_overrides(TrainConfig(), ["d=2000"]).model, _data(cfg), torch.device("cpu")
    )  # 34M parameters: 0.5 GiB


def test_the_cpu_has_memory():
    from creditaudit.training.allocator import device_memory

    assert device_memory(torch.device("cpu")) > 2**28
    assert device_memory(torch.device("meta")) is None  # unknown: the check refuses nothing
