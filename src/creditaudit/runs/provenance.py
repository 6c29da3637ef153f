"""Provenance recorded in every run summary: code version, library versions, device, git state.

A number in a paper must be traceable to the code and the machine that produced it (docs/science.md §6,
STYLE item 5). :func:`provenance` gathers that as a flat JSON-able dict. It never records the
hostname or user name: summaries get published, and ``machine`` (the CPU architecture) plus the
device name say what matters for reproducing a timing.

The git fields describe the source tree the *imported* ``creditaudit`` package lives in — the code
that actually ran, not the current working directory. They are ``None`` when that is not a git
checkout (an installed wheel, a venv that is git-ignored inside some repository, git missing, a
repository git refuses to read, or git too slow); collecting provenance never raises.
``git_dirty`` counts untracked files too: a new, uncommitted rule file changes what ran.
"""

from __future__ import annotations

import os
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["git_state", "package_dir", "provenance"]

_GIT_TIMEOUT_S = 5.0


def package_dir() -> Path:
    """The folder of the imported ``creditaudit`` package."""
    return Path(__file__).resolve().parents[1]


def _git(directory: Path, *args: str) -> subprocess.CompletedProcess[str] | None:
    """Run ``git -C directory args``; None if git is missing, hangs or cannot start."""
    env = dict(os.environ)
    # Many workers may record provenance at once: forbid `git status` from taking index.lock to
    # refresh the index (it would make concurrent callers fail). Also fix the output language.
    env.update(GIT_OPTIONAL_LOCKS="0", LC_ALL="C", GIT_TERMINAL_PROMPT="0")
    try:
        return subprocess.run(
            ["git", "-C", str(directory), *args],
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
            env=env,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError):
        return None


def git_state(directory: str | os.PathLike[str] | None = None) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the git work tree holding ``directory`` (default: the package).

    ``commit`` is the full HEAD hash (None in a repository without commits); ``dirty`` is True if
    ``git status --porcelain`` lists anything. Both are None when ``directory`` is not inside a
    work tree, is git-ignored there (e.g. a virtualenv inside a project), or git is unavailable.
    """
    directory = Path(directory) if directory is not None else package_dir()
    if not directory.is_dir():
        return None, None
    top = _git(directory, "rev-parse", "--show-toplevel")
    if top is None or top.returncode != 0 or not top.stdout.strip():
        return None, None
    ignored = _git(directory, "check-ignore", "-q", str(directory))
    if ignored is None or ignored.returncode == 0:  # 0: ignored -> not part of this source tree
        return None, None
    head = _git(directory, "rev-parse", "--verify", "-q", "HEAD")
    commit = head.stdout.strip() if head is not None and head.returncode == 0 else None
    status = _git(directory, "status", "--porcelain")
    dirty = bool(status.stdout.strip()) if status is not None and status.returncode == 0 else None
    return commit or None, dirty


def provenance(device: str | torch.device | None = None) -> dict[str, Any]:
    """Where and with what a run ran, as a flat JSON-able dict.

    Keys (always present; None where not applicable or unknown): ``creditaudit_version``,
    ``python``, ``torch``, ``numpy``, ``safetensors``, ``platform``, ``machine``,
    ``torch_threads``, ``device`` (``str(torch.device(device))``; None if not given),
    ``device_name`` and ``cuda_version`` / ``cudnn_version`` (CUDA devices only),
    ``git_commit``, ``git_dirty``, ``timestamp`` (UTC, ISO 8601, seconds).
    """
    import safetensors

    from creditaudit._version import __version__

    dev = torch.device(device) if device is not None else None
    device_name = cuda_version = cudnn_version = None
    if dev is not None and dev.type == "cuda":
        cuda_version = torch.version.cuda
        try:
            device_name = torch.cuda.get_device_name(dev)
            cudnn_version = torch.backends.cudnn.version()
        except (RuntimeError, AssertionError, AttributeError):  # no driver / not a CUDA build
            pass
    commit, dirty = git_state()
    return {
        "creditaudit_version": __version__,
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "safetensors": getattr(safetensors, "__version__", None),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "device": str(dev) if dev is not None else None,
        "device_name": device_name,
        "cuda_version": cuda_version,
        "cudnn_version": cudnn_version,
        "git_commit": commit,
        "git_dirty": dirty,
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
