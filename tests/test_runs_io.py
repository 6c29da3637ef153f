"""Crash-safe run-folder I/O: atomic writes never leave a partial target, JSON lines survive a
torn last line and name a corrupt middle line, and provenance never crashes on git."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from creditaudit.runs import io as rio
from creditaudit.runs import provenance as prov
from creditaudit.runs.io import (
    CorruptRunError,
    append_jsonl,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_jsonl,
    read_jsonl_checked,
    rewrite_jsonl,
)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(rio.PARTIAL_SUFFIX))


# ---------------------------------------------------------------------------------------------
# atomic writes
# ---------------------------------------------------------------------------------------------


def test_atomic_writes_replace_content(tmp_path):
    target = tmp_path / "sub" / "a.txt"  # parent is created
    atomic_write_text(target, "old")
    atomic_write_text(target, "new ü")
    assert target.read_text(encoding="utf-8") == "new ü"
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert _leftovers(target.parent) == []


@pytest.mark.parametrize(
    "writer, payload",
    [
        (atomic_write_text, "new content"),
        (atomic_write_bytes, b"new content"),
        (atomic_write_json, {"new": 1}),
    ],
)
def test_failed_replace_keeps_old_file_and_leaks_no_temp(tmp_path, monkeypatch, writer, payload):
    target = tmp_path / "summary.json"
    target.write_text("old content")

    def boom(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(rio.os, "replace", boom)
    with pytest.raises(OSError, match="simulated crash"):
        writer(target, payload)
    assert target.read_text() == "old content"
    assert os.listdir(tmp_path) == ["summary.json"]


def test_failed_write_of_new_file_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(rio.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(tmp_path / "config.json", "x")
    assert os.listdir(tmp_path) == []


def test_atomic_write_json_is_strict_sorted_and_converts(tmp_path):
    target = tmp_path / "s.json"
    obj = {
        "b": float("nan"),
        "a": [1.5, float("inf"), -float("inf")],
        "np": np.float32(0.25),
        "arr": np.arange(3),
        "t": torch.tensor([1, 2]),
        "tup": (1, "x"),
        "p": Path("/r/x"),
        "nested": {"z": np.int64(7), "ok": True, "none": None},
    }
    atomic_write_json(target, obj)
    text = target.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert text.endswith("\n") and text.index('"a"') < text.index('"b"')  # sorted, indented
    back = json.loads(text)
    assert back == {
        "a": [1.5, None, None],
        "arr": [0, 1, 2],
        "b": None,
        "nested": {"none": None, "ok": True, "z": 7},
        "np": 0.25,
        "p": "/r/x",
        "t": [1, 2],
        "tup": [1, "x"],
    }


def test_to_jsonable_names_the_offending_location():
    with pytest.raises(TypeError, match=r"\$\['cfg'\]\['fn'\].*function"):
        rio.to_jsonable({"cfg": {"fn": lambda: 0}})


def test_remove_partial_files(tmp_path):
    (tmp_path / ".summary.json.ab12cd34.partial").write_text("half")
    (tmp_path / "summary.json").write_text("{}")
    removed = rio.remove_partial_files(tmp_path)
    assert [p.name for p in removed] == [".summary.json.ab12cd34.partial"]
    assert os.listdir(tmp_path) == ["summary.json"]
    assert rio.remove_partial_files(tmp_path / "missing") == []


# ---------------------------------------------------------------------------------------------
# JSON lines
# ---------------------------------------------------------------------------------------------


def test_append_and_read_jsonl(tmp_path):
    path = tmp_path / "m" / "metrics.jsonl"
    records = [
        {"epoch": i, "train/loss": 1.0 / (i + 1), "diag/hL_norm": float("nan")} for i in range(3)
    ]
    for r in records:
        append_jsonl(path, r)
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and list(json.loads(lines[0])) == ["epoch", "train/loss", "diag/hL_norm"]
    back = read_jsonl(path)
    assert [r["epoch"] for r in back] == [0, 1, 2]
    assert back[1]["train/loss"] == 0.5 and back[1]["diag/hL_norm"] is None
    assert read_jsonl_checked(path) == (back, 0)


def test_append_rejects_non_dict(tmp_path):
    with pytest.raises(TypeError, match="must be a dict"):
        append_jsonl(tmp_path / "m.jsonl", [1, 2])  # type: ignore[arg-type]


def test_torn_last_line_is_skipped_and_repaired_by_next_append(tmp_path):
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, {"epoch": 0})
    append_jsonl(path, {"epoch": 1})
    with open(path, "ab") as f:  # a crash in the middle of the third append
        f.write(b'{"epoch": 2, "train/lo')
    assert read_jsonl(path) == [{"epoch": 0}, {"epoch": 1}]
    assert read_jsonl_checked(path) == ([{"epoch": 0}, {"epoch": 1}], 1)
    # resuming appends after it: the fragment is cut, never becomes a corrupt middle line
    append_jsonl(path, {"epoch": 2})
    assert read_jsonl_checked(path) == ([{"epoch": i} for i in range(3)], 0)


def test_torn_multibyte_utf8_and_complete_line_without_newline(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"a": 1}\n{"name": "\xc3')  # cut inside a 2-byte character
    assert read_jsonl_checked(path) == ([{"a": 1}], 1)
    path.write_bytes(b'{"a": 1}\n{"a": 2}')  # whole record, only its newline missing: kept
    assert read_jsonl_checked(path) == ([{"a": 1}, {"a": 2}], 0)
    append_jsonl(path, {"a": 3})
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}, {"a": 3}]


def test_corrupt_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 0}\n\n{"epoch": 1\n{"epoch": 2}\n')
    with pytest.raises(CorruptRunError) as err:
        read_jsonl(path)
    assert err.value.line == 3 and err.value.path == str(path)
    assert str(path) in str(err.value) and "line 3" in str(err.value) and "Fix:" in str(err.value)
    path.write_text('{"epoch": 0}\n[1, 2]\n{"epoch": 2}\n')  # valid JSON, but not a record
    with pytest.raises(CorruptRunError, match="line 2"):
        read_jsonl(path)


def test_read_jsonl_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    assert read_jsonl_checked(tmp_path / "empty.jsonl") == ([], 0)


def test_rewrite_jsonl_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    for i in range(5):
        append_jsonl(path, {"epoch": i})
    rewrite_jsonl(path, read_jsonl(path)[:3])
    assert read_jsonl(path) == [{"epoch": i} for i in range(3)]
    monkeypatch.setattr(rio.os, "replace", lambda a, b: (_ for _ in ()).throw(OSError("crash")))
    with pytest.raises(OSError):
        rewrite_jsonl(path, [])
    assert read_jsonl(path) == [{"epoch": i} for i in range(3)]
    assert _leftovers(tmp_path) == []


def test_corrupt_run_error_reduces():
    err = CorruptRunError("/r/metrics.jsonl", "bad", line=4, fix="delete it")
    back = copy.deepcopy(err)  # the __reduce__ protocol Ray's pickling uses
    assert str(back) == str(err) and back.line == 4 and back.fix == "delete it"


# ---------------------------------------------------------------------------------------------
# provenance
# ---------------------------------------------------------------------------------------------

PROVENANCE_KEYS = {
    "creditaudit_version",
    "python",
    "torch",
    "numpy",
    "platform",
    "machine",
    "torch_threads",
    "device",
    "device_name",
    "cuda_version",
    "git_commit",
    "git_dirty",
    "timestamp",
}


def test_provenance_keys_and_privacy():
    import socket

    import creditaudit

    p = prov.provenance("cpu")
    assert set(p) >= PROVENANCE_KEYS
    assert p["creditaudit_version"] == creditaudit.__version__
    assert p["torch"] == torch.__version__ and p["numpy"] == np.__version__
    assert p["device"] == "cpu" and p["device_name"] is None and p["cuda_version"] is None
    assert p["torch_threads"] == torch.get_num_threads()
    assert p["timestamp"].endswith("+00:00")
    assert p["git_dirty"] in (True, False, None)
    assert "hostname" not in p and socket.gethostname() not in json.dumps(p)
    json.dumps(p, allow_nan=False)  # JSON-able as is
    assert prov.provenance()["device"] is None
    assert prov.provenance(torch.device("cpu"))["device"] == "cpu"


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(
        [
            "git",
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "-c",
            "init.defaultBranch=main",
            *args,
        ],
        cwd=cwd,
        check=True,
        capture_output=True,
    )


@pytest.mark.skipif(
    subprocess.run(["git", "--version"], capture_output=True).returncode != 0,
    reason="git not installed",
)
def test_git_state_inside_and_outside_a_repo(tmp_path, monkeypatch):
    plain = tmp_path / "plain"
    plain.mkdir()
    assert prov.git_state(plain) == (None, None)
    assert prov.git_state(tmp_path / "missing") == (None, None)

    repo = tmp_path / "repo"
    pkg = repo / "src" / "creditaudit"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("x = 1\n")
    (repo / ".gitignore").write_text(".venv/\n")
    _git(repo, "init", "-q")
    assert prov.git_state(pkg) == (None, True)  # no commit yet, untracked files
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "init")
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert prov.git_state(pkg) == (head, False)
    (pkg / "__init__.py").write_text("x = 2\n")
    assert prov.git_state(pkg) == (head, True)

    # a package installed into a git-ignored venv inside the repo is not "this source tree"
    venv_pkg = repo / ".venv" / "lib" / "site-packages" / "creditaudit"
    venv_pkg.mkdir(parents=True)
    assert prov.git_state(venv_pkg) == (None, None)

    # provenance() looks at the imported package's folder
    monkeypatch.setattr(prov, "package_dir", lambda: pkg)
    p = prov.provenance()
    assert (p["git_commit"], p["git_dirty"]) == (head, True)
    monkeypatch.setattr(prov, "package_dir", lambda: plain)
    p = prov.provenance()
    assert (p["git_commit"], p["git_dirty"]) == (None, None)


def test_git_missing_or_hanging_never_crashes(tmp_path, monkeypatch):
    def missing(*a, **k):
        raise FileNotFoundError("git")

    monkeypatch.setattr(prov.subprocess, "run", missing)
    assert prov.git_state(tmp_path) == (None, None)

    def hang(cmd, **k):
        raise subprocess.TimeoutExpired(cmd, k.get("timeout"))

    monkeypatch.setattr(prov.subprocess, "run", hang)
    p = prov.provenance("cpu")
    assert p["git_commit"] is None and p["git_dirty"] is None


def test_provenance_values_are_finite_numbers_or_strings():
    p = prov.provenance("cpu")
    for k, v in p.items():
        assert v is None or isinstance(v, (str, bool, int)) or math.isfinite(v), k
