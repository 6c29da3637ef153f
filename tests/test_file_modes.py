"""Every file of a run folder gets the mode a plainly created file would, 0o666 & ~umask — config,
summary, metrics, run.lock, checkpoints (safetensors writes 0o600 files of its own) and reports
written by atomic writes — so a shared results folder (a Ray cluster's meeting point) is readable by
the users and nodes the umask lets in."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from creditaudit.runs.checkpoint import load_checkpoint, save_checkpoint, save_tensors
from creditaudit.runs.folder import RunFolder
from creditaudit.runs.io import (
    append_jsonl,
    atomic_replace,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=lambda m: f"umask{m:03o}")
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _modes(root) -> dict[str, int]:
    return {
        str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_every_run_file_follows_the_umask(tmp_path, umask):
    f = RunFolder(tmp_path / "setting" / "dfa__resmlp__s42")
    with f.lock():
        f.write_config({"rule": "dfa"})
        f.write_summary({"status": "running"})
        f.append_metrics({"epoch": 1})
        f.rewrite_metrics([{"epoch": 1}])
        save_checkpoint(f.last_checkpoint, {"w": torch.arange(3.0)}, {"epoch": 1})
        save_checkpoint(f.epoch_checkpoint(1), {"w": torch.arange(3.0)}, {"epoch": 1})
        save_tensors(f.path / "weights.safetensors", {"w": torch.ones(2)})
        save_checkpoint(f.last_checkpoint, {"w": torch.zeros(3)}, {"epoch": 2})  # replacing one
        f.write_summary({"status": "finished"})
        modes = _modes(tmp_path)  # run.lock too, while it is held
    reports = tmp_path / "_reports" / "setting"
    atomic_write_text(reports / "audit.md", "# audit\n")
    atomic_write_bytes(reports / "norms.png", b"\x89PNG")
    atomic_write_json(reports / "data.json", {"a": 1})
    append_jsonl(reports / "log.jsonl", {"a": 1})
    modes.update(_modes(tmp_path))

    want = 0o666 & ~umask
    assert set(modes) >= {
        "setting/dfa__resmlp__s42/" + n
        for n in (
            "config.json",
            "summary.json",
            "metrics.jsonl",
            "run.lock",
            "weights.safetensors",
            "checkpoints/last.safetensors",
            "checkpoints/epoch_0001.safetensors",
        )
    }
    assert {name: oct(m) for name, m in modes.items() if m != want} == {}, f"want {oct(want)}"
    assert not any(p.name.endswith(".partial") for p in tmp_path.rglob("*"))  # no debris left
    state, meta = load_checkpoint(f.last_checkpoint)
    assert torch.equal(state["w"], torch.zeros(3)) and meta == {"epoch": 2}


def test_a_failed_atomic_write_leaves_nothing_behind(tmp_path, umask):
    """The temporary file now exists before the writer runs: a writer that fails removes it."""
    with pytest.raises(ZeroDivisionError), atomic_replace(tmp_path / "x.json") as tmp:
        assert tmp.exists() and stat.S_IMODE(tmp.stat().st_mode) == 0o666 & ~umask
        raise ZeroDivisionError
    assert [p.name for p in tmp_path.rglob("*")] == []
