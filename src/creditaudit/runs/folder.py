"""One run folder: its name, its files, its status, and an exclusive lock on it.

Layout (DESIGN §6; names from the sweep axes as in CleanRL's ``{env}__{exp}__{seed}``)::

    <results_dir>/<setting>/<rule>__<arch>__s<seed>/
        config.json                 resolved config (atomic)
        metrics.jsonl               one JSON line per epoch, append-only
        summary.json                final metrics, verdict, status, provenance (atomic)
        checkpoints/last.safetensors, checkpoints/epoch_0005.safetensors, ...
        run.lock                    present while a process owns the run

``summary.json`` is the run's state machine: absent (never started, or killed before its first
summary) -> ``running`` -> ``finished`` | ``failed`` | ``diverged`` | ``interrupted``. A sweep skips
``finished`` runs and resumes the others.

Locking. Sweeps start the same run from several workers or machines sharing one results folder,
so ownership is a lock *file* created with ``O_CREAT | O_EXCL`` (atomic on local filesystems and
on NFSv3+). It holds JSON: ``pid``, ``host`` (a hash of the hostname: lock files can be left in a
results folder that gets shared, so the hostname itself is not written), ``scope`` (a hash of
hostname, kernel boot id and pid namespace: within one scope a pid means one process), ``started``,
a random ``token``, and ``flock``. A lock left by a dead process is taken over only when that can
be proved: same scope and the pid no longer exists, or — on POSIX, where the holder also keeps an
``fcntl.flock`` on the file — same scope and nobody holds the flock (the pid was reused, or the
holder is a zombie). A lock from another machine, container or boot is never taken over
automatically: there is no way to tell a crashed remote process from a slow one without leases, so
the error says which process holds it and to delete ``run.lock`` once it is known to be gone.
Takeover is serialised by a ``run.lock.takeover`` directory (``mkdir`` is atomic everywhere), so
two processes that both see the same stale lock cannot both win.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
import uuid
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

from .io import (CorruptRunError, append_jsonl, atomic_write_json, read_jsonl,
                 remove_partial_files, rewrite_jsonl)

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "RUN_STATUSES",
    "RunFolder",
    "RunLock",
    "RunLockedError",
    "parse_run_name",
    "run_dir",
    "run_name",
]

RUN_STATUSES = ("running", "finished", "failed", "diverged", "interrupted")
"""Values of ``summary["status"]``; :meth:`RunFolder.status` adds ``"absent"`` (no summary)."""

_SEP = "__"
_BAD_CHARS = re.compile(r"[/\\\x00-\x1f]")


# ---------------------------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------------------------

def _check_component(kind: str, value: Any, *, allow_sep: bool = False) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{kind} must be a str, got {type(value).__name__} {value!r}")
    if not value:
        raise ValueError(f"{kind} must not be empty")
    if _BAD_CHARS.search(value):
        raise ValueError(f"{kind} {value!r} contains a path separator or control character")
    if value.startswith("."):
        raise ValueError(f"{kind} {value!r} must not start with '.' (hidden / relative path)")
    if not allow_sep and _SEP in value:
        raise ValueError(f"{kind} {value!r} contains {_SEP!r}, which separates the parts of a run "
                         "name; use a single '_' or '-'")
    return value


def run_name(rule: str, arch: str, seed: int) -> str:
    """``f"{rule}__{arch}__s{seed}"``, after checking each part (ValueError with the reason)."""
    _check_component("rule", rule)
    _check_component("arch", arch)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return f"{rule}{_SEP}{arch}{_SEP}s{seed}"


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


def run_dir(results_dir: str | os.PathLike[str], setting: str, rule: str, arch: str,
            seed: int) -> Path:
    """``results_dir / setting / run_name(rule, arch, seed)``."""
    _check_component("setting", setting, allow_sep=True)
    return Path(results_dir) / setting / run_name(rule, arch, seed)


# ---------------------------------------------------------------------------------------------
# lock
# ---------------------------------------------------------------------------------------------

class RunLockedError(RuntimeError):
    """Another process owns the run folder. ``str(err)`` says who and how to clear a stale lock."""

    def __init__(self, lock_path: str | os.PathLike[str], detail: str):
        self.lock_path = os.fspath(lock_path)
        self.detail = detail
        super().__init__(f"run folder {os.path.dirname(self.lock_path)} is locked: {detail}")

    def __reduce__(self):  # picklable (Ray ships exceptions by pickle)
        return (RunLockedError, (self.lock_path, self.detail))


def _hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def _read_first_line(path: str) -> str:
    try:
        with open(path) as f:
            return f.readline().strip()
    except OSError:
        return ""


def _identity() -> tuple[str, str]:
    """``(host, scope)``: a hostname hash, and a hash of hostname + boot id + pid namespace."""
    hostname = socket.gethostname()
    boot_id = _read_first_line("/proc/sys/kernel/random/boot_id")
    try:
        pid_ns = str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        pid_ns = ""
    return _hash(hostname), _hash(hostname, boot_id, pid_ns)


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` exists in this pid namespace; True when it cannot be told (Windows)."""
    if sys.platform == "win32":  # os.kill(pid, 0) would *terminate* the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by another user
        return True
    return True


def _flock_free(path: Path) -> bool:
    """Whether nobody holds an ``fcntl.flock`` on ``path`` (False if it cannot be checked)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    finally:
        os.close(fd)


class RunLock:
    """Exclusive ownership of a run folder (see the module docstring for the protocol).

    Use as a context manager (``with folder.lock(): ...``) or call :meth:`acquire` /
    :meth:`release`. Not re-entrant: a second acquisition, even from the same process, raises
    :class:`RunLockedError`. Released on exit, exceptions included. ``clean``: folders whose
    ``.*.partial`` files (debris of atomic writes cut short by a crash) are deleted once held.
    """

    def __init__(self, path: str | os.PathLike[str], *,
                 clean: Iterable[str | os.PathLike[str]] = ()):
        self.path = Path(path)
        self.clean = tuple(Path(p) for p in clean)  # folders to clear of .partial debris once held
        self._fd: int | None = None
        self._token: str | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        if self.held:
            raise RunLockedError(self.path, "this RunLock object already holds it")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # At most: try, find a stale lock, remove it, try again; a third loser gives up.
        for _ in range(3):
            if self._try_create():
                for folder in self.clean:
                    remove_partial_files(folder)
                return
            if not self.path.exists():  # released between our two looks: just try again
                continue
            info = self._read()
            reason = self._stale_reason(info)
            if reason is None:
                raise RunLockedError(self.path, self._describe(info))
            self._take_over(info, reason)
        raise RunLockedError(self.path, self._describe(self._read()))

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            info = self._read()
            if info is not None and info.get("token") == self._token:
                self.path.unlink(missing_ok=True)
            else:
                warnings.warn(f"{self.path} was removed or replaced while this process held it; "
                              "leaving it alone", RuntimeWarning, stacklevel=2)
        finally:
            os.close(self._fd)  # closing also drops the flock; after the unlink on purpose
            self._fd = self._token = None

    # -- internals -----------------------------------------------------------------------------

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        flocked = False
        try:
            if fcntl is not None:
                try:  # before writing the content: a readable lock file implies a held flock
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    flocked = True
                except OSError:  # e.g. an NFS mount without lock support
                    flocked = False
            host, scope = _identity()
            token = uuid.uuid4().hex
            info = {"pid": os.getpid(), "host": host, "scope": scope, "token": token,
                    "flock": flocked,
                    "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            os.write(fd, (json.dumps(info) + "\n").encode())
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        self._fd, self._token = fd, token
        return True

    def _read(self) -> dict | None:
        """The lock file's content, or None if it is missing, empty or unparsable."""
        try:
            info = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None

    def _stale_reason(self, info: dict | None) -> str | None:
        """Why the lock described by ``info`` is provably abandoned, or None if it may be live."""
        if info is None:  # being written right now, or its writer died before writing: unknown
            return None
        _, scope = _identity()
        if info.get("scope") != scope:
            return None
        pid = info["pid"]
        if not _pid_alive(pid):
            return f"its process {pid} no longer exists"
        if info.get("flock") and _flock_free(self.path):
            return f"no process holds its flock (pid {pid} was reused or is a zombie)"
        return None

    def _take_over(self, stale: dict, reason: str) -> None:
        """Remove the stale lock ``stale`` unless someone replaced it meanwhile."""
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            os.mkdir(guard)
        except FileExistsError:
            raise RunLockedError(
                self.path, f"another process is taking over a stale lock right now. If none is "
                f"(a crash mid-takeover), delete the folder {guard} and retry") from None
        try:
            current = self._read()
            if current is not None and current.get("token") == stale.get("token"):
                self.path.unlink(missing_ok=True)
                # stacklevel: _take_over <- acquire <- __enter__ <- the caller's `with`
                warnings.warn(f"took over stale lock {self.path}: {reason}", RuntimeWarning,
                              stacklevel=4)
        finally:
            os.rmdir(guard)

    def _describe(self, info: dict | None) -> str:
        clear = f"if no process is running this run any more, delete {self.path} and retry"
        if info is None:
            return (f"{self.path} exists but holds no readable owner (being created right now, "
                    f"or left by a process that died while creating it); {clear}")
        host, scope = _identity()
        where = ("this process" if info.get("scope") == scope and info["pid"] == os.getpid()
                 else "this machine" if info.get("scope") == scope
                 else "this host, another container or boot" if info.get("host") == host
                 else f"another machine (host id {info.get('host')})")
        return (f"held by pid {info['pid']} on {where} since {info.get('started', '?')}; "
                f"wait for it to finish, or {clear}")


# ---------------------------------------------------------------------------------------------
# run folder
# ---------------------------------------------------------------------------------------------

class RunFolder:
    """The files of one run, at ``path`` (which need not exist yet).

    Reads are tolerant where a crash can legitimately leave things (a missing summary, a torn last
    metrics line) and strict elsewhere (:class:`CorruptRunError`). Writes are atomic or
    append-and-fsync (:mod:`creditaudit.runs.io`) and create the folder as needed.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    @classmethod
    def for_run(cls, results_dir: str | os.PathLike[str], setting: str, rule: str, arch: str,
                seed: int) -> RunFolder:
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
            digits = p.stem[len("epoch_"):]
            if digits.isdigit():
                found[int(digits)] = p
        return dict(sorted(found.items()))

    # -- reads ---------------------------------------------------------------------------------

    def _read_json(self, path: Path) -> dict | None:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise CorruptRunError(path, f"not valid JSON ({e})",
                                  fix="delete the run folder to rerun the run from scratch") from e
        if not isinstance(obj, dict):
            raise CorruptRunError(path, f"holds a JSON {type(obj).__name__}, not an object",
                                  fix="delete the run folder to rerun the run from scratch")
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

    def status(self) -> str:
        """``"absent"`` without a summary, else ``summary["status"]`` (in :data:`RUN_STATUSES`)."""
        summary = self.read_summary()
        if summary is None:
            return "absent"
        status = summary.get("status")
        if status not in RUN_STATUSES:
            raise CorruptRunError(self.summary_path, f"status {status!r} is not one of "
                                  f"{', '.join(RUN_STATUSES)}",
                                  fix="delete the run folder to rerun the run from scratch")
        return status

    def exists(self) -> bool:
        return self.path.is_dir()

    # -- writes --------------------------------------------------------------------------------

    def write_config(self, config: Mapping[str, Any]) -> None:
        atomic_write_json(self.config_path, dict(config))

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Atomically replace the summary; ``summary["status"]`` must be in :data:`RUN_STATUSES`."""
        if summary.get("status") not in RUN_STATUSES:
            raise ValueError(f"summary['status'] must be one of {RUN_STATUSES}, "
                             f"got {summary.get('status')!r}")
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
