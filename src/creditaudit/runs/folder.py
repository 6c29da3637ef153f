"""One run folder: its name, its files, its status, and an exclusive lock on it.

Layout (docs/science.md §6; names from the sweep axes as in CleanRL's ``{env}__{exp}__{seed}``)::

    <results_dir>/<setting>/<rule>__<arch>__s<seed>/
        config.json                 resolved config (atomic)
        metrics.jsonl               one JSON line per epoch, append-only
        summary.json                final metrics, verdict, status, provenance (atomic)
        checkpoints/last.safetensors, checkpoints/epoch_0005.safetensors, ...
        run.lock                    present while a process owns the run

``summary.json`` is the run's state machine: absent (never started, or killed before its first
summary) -> ``running`` -> ``finished`` | ``failed`` | ``diverged`` | ``interrupted``. A sweep skips
``finished`` runs and resumes the others.

The lock protocol (``run.lock``) lives in :mod:`creditaudit.runs.lock`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from creditaudit.errors import ConfigError, UserError

from .io import CorruptRunError, append_jsonl, atomic_write_json, read_jsonl, rewrite_jsonl
from .lock import RunLock, RunLockedError

__all__ = [
    "RUN_STATUSES",
    "RunConfigMismatch",
    "RunFolder",
    "RunLock",
    "RunLockedError",
    "check_name",
    "parse_run_name",
    "run_dir",
    "run_name",
]

RUN_STATUSES = ("running", "finished", "failed", "diverged", "interrupted")
"""Values of ``summary["status"]``; :meth:`RunFolder.status` adds ``"absent"`` (no summary)."""

_SEP = "__"
_BAD_CHARS = re.compile(r"[/\\\x00-\x1f]")
NAME_MAX = 255
"""Bytes a file or folder name may have (ext4, XFS, btrfs; APFS and NTFS count 255 characters)."""


# ---------------------------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------------------------


def _shown(value: str) -> str:
    return repr(value if len(value) <= 40 else value[:40] + "…")


def check_name(kind: str, value: Any, *, allow_sep: bool = False) -> str:
    """``value`` if it can name one folder (a setting, a rule, an architecture label), else a
    :class:`~creditaudit.errors.ConfigError` (a ``ValueError``) naming ``kind`` and the fix."""
    if not isinstance(value, str):
        raise ConfigError(f"{kind} must be a str, got {type(value).__name__} {value!r}")
    if not value:
        raise ConfigError(f"{kind} must not be empty: it names a folder")
    if _BAD_CHARS.search(value):
        raise ConfigError(
            f"{kind}={_shown(value)} contains a path separator or control character; "
            "it names one folder: use letters, digits, '_', '-', '.'"
        )
    if value.startswith("."):
        raise ConfigError(
            f"{kind}={_shown(value)} must not start with '.' (a hidden or relative folder); "
            "start it with a letter or digit"
        )
    if not allow_sep and _SEP in value:
        raise ConfigError(
            f"{kind}={_shown(value)} contains {_SEP!r}, which separates the parts of a run "
            "name; use a single '_' or '-'"
        )
    size = len(value.encode("utf-8"))
    if size > NAME_MAX:
        raise ConfigError(
            f"{kind}={_shown(value)} is {size} bytes long, but a folder name has at most "
            f"{NAME_MAX}: choose a shorter {kind}"
        )
    return value


def run_name(rule: str, arch: str, seed: int) -> str:
    """``f"{rule}__{arch}__s{seed}"``, after checking each part (ConfigError, a ValueError, with the
    reason)."""
    check_name("rule", rule)
    check_name("arch", arch)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative int, got {seed!r}")
    name = f"{rule}{_SEP}{arch}{_SEP}s{seed}"
    if len(name.encode("utf-8")) > NAME_MAX:
        raise ConfigError(
            f"the run folder's name {_shown(name)} would be {len(name.encode('utf-8'))} bytes long, "
            f"but a folder name has at most {NAME_MAX}: choose a shorter arch_label"
        )
    return name


def parse_run_name(name: str) -> tuple[str, str, int]:
    """Inverse of :func:`run_name`: ``"dfa__resmlp__s42"`` -> ``("dfa", "resmlp", 42)``."""
    parts = name.split(_SEP)
    if len(parts) != 3 or not parts[2].startswith("s") or not parts[2][1:].isdigit():
        raise ValueError(f"{name!r} is not a run name of the form <rule>__<arch>__s<seed>")
    rule, arch, seed = parts[0], parts[1], int(parts[2][1:])
    try:
        canonical = run_name(rule, arch, seed)
    except ValueError as e:
        raise ValueError(f"{name!r} is not a run name: {e}") from None
    if canonical != name:  # e.g. "s042"
        raise ValueError(f"{name!r} is not a run name of the form <rule>__<arch>__s<seed>")
    return rule, arch, seed


def run_dir(
    results_dir: str | os.PathLike[str], setting: str, rule: str, arch: str, seed: int
) -> Path:
    """``results_dir / setting / run_name(rule, arch, seed)``."""
    check_name("setting", setting, allow_sep=True)
    return Path(results_dir) / setting / run_name(rule, arch, seed)


# ---------------------------------------------------------------------------------------------


class RunConfigMismatch(UserError, RuntimeError):
    """The run folder already holds a run with a different configuration; ``differences`` says
    how it differs (``"path: old -> new"``)."""

    def __init__(self, path: str | os.PathLike[str], differences: list[str]):
        self.path, self.differences = os.fspath(path), list(differences)
        super().__init__(
            f"{self.path} already holds a run with a different config ({'; '.join(differences)}). "
            "Use another setting=NAME or results=DIR, or delete that folder to train it again."
        )

    def __reduce__(self):  # picklable (Ray ships exceptions by pickle)
        return (RunConfigMismatch, (self.path, self.differences))


class RunFolder:
    """The files of one run, at ``path`` (which need not exist yet).

    Reads are tolerant where a crash can legitimately leave things (a missing summary, a torn last
    metrics line) and strict elsewhere (:class:`CorruptRunError`). Writes are atomic or
    append-and-fsync (:mod:`creditaudit.runs.io`) and create the folder as needed.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    @classmethod
    def for_run(
        cls, results_dir: str | os.PathLike[str], setting: str, rule: str, arch: str, seed: int
    ) -> RunFolder:
        """The folder ``results_dir/setting/rule__arch__s{seed}``."""
        return cls(run_dir(results_dir, setting, rule, arch, seed))

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunFolder) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    # -- paths ---------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def lock_path(self) -> Path:
        return self.path / "run.lock"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoint_dir / "last.safetensors"

    def epoch_checkpoint(self, epoch: int) -> Path:
        """``checkpoints/epoch_{epoch:04d}.safetensors``."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        return self.checkpoint_dir / f"epoch_{epoch:04d}.safetensors"

    def epoch_checkpoints(self) -> dict[int, Path]:
        """Existing per-epoch checkpoints, ``epoch -> path``, in epoch order."""
        found = {}
        for p in self.checkpoint_dir.glob("epoch_*.safetensors"):
            digits = p.stem[len("epoch_") :]
            if digits.isdigit():
                found[int(digits)] = p
        return dict(sorted(found.items()))

    # -- reads ---------------------------------------------------------------------------------

    def _read_json(self, path: Path) -> dict | None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except UnicodeDecodeError as e:
            raise CorruptRunError(
                path,
                f"not UTF-8 text ({e.reason} at byte {e.start}), so not the JSON creditaudit writes",
                fix="repair it, or delete the run folder to rerun the run from scratch",
            ) from e
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise CorruptRunError(
                path,
                f"not valid JSON ({e})",
                fix="delete the run folder to rerun the run from scratch",
            ) from e
        if not isinstance(obj, dict):
            raise CorruptRunError(
                path,
                f"holds a JSON {type(obj).__name__}, not an object",
                fix="delete the run folder to rerun the run from scratch",
            )
        return obj

    def read_config(self) -> dict | None:
        """The resolved config, or None if not written yet."""
        return self._read_json(self.config_path)

    def read_summary(self) -> dict | None:
        """The summary, or None if absent; :class:`CorruptRunError` if unparsable."""
        return self._read_json(self.summary_path)

    def read_metrics(self) -> list[dict]:
        """The per-epoch records ([] if none), skipping a torn last line."""
        if not self.metrics_path.exists():
            return []
        return read_jsonl(self.metrics_path)

    def check_config(self, differences: Callable[[dict], list[str]]) -> None:
        """Raise :class:`RunConfigMismatch` when the folder holds another run's config:
        ``differences(config)`` lists how the stored config differs from the run's in what the
        run computes, nothing when it is the same run. A folder without a config passes."""
        stored = self.read_config()
        found = differences(stored) if stored is not None else []
        if found:
            raise RunConfigMismatch(self.path, found)

    def status(self) -> str:
        """``"absent"`` without a summary, else ``summary["status"]`` (in :data:`RUN_STATUSES`)."""
        summary = self.read_summary()
        if summary is None:
            return "absent"
        status = summary.get("status")
        if status not in RUN_STATUSES:
            raise CorruptRunError(
                self.summary_path,
                f"status {status!r} is not one of {', '.join(RUN_STATUSES)}",
                fix="delete the run folder to rerun the run from scratch",
            )
        return status

    def exists(self) -> bool:
        return self.path.is_dir()

    # -- writes --------------------------------------------------------------------------------

    def write_config(self, config: Mapping[str, Any]) -> None:
        atomic_write_json(self.config_path, dict(config))

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Atomically replace the summary; ``summary["status"]`` must be in :data:`RUN_STATUSES`."""
        if summary.get("status") not in RUN_STATUSES:
            raise ValueError(
                f"summary['status'] must be one of {RUN_STATUSES}, got {summary.get('status')!r}"
            )
        atomic_write_json(self.summary_path, dict(summary))

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        append_jsonl(self.metrics_path, record)

    def rewrite_metrics(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Atomically replace the metrics (on resume: drop records past the resumed checkpoint)."""
        rewrite_jsonl(self.metrics_path, records)

    # -- ownership -----------------------------------------------------------------------------

    def lock(self) -> RunLock:
        """A :class:`RunLock` on ``run.lock``; use ``with folder.lock(): ...``.

        Once held, debris of writes interrupted by an earlier crash (``.*.partial`` files in the
        folder and in ``checkpoints/``) is removed: nobody else may be writing here now.
        """
        return RunLock(self.lock_path, clean=(self.path, self.checkpoint_dir))
