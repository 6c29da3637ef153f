"""The exclusive lock on a run folder (``run.lock``), so that no run is trained twice at once.

Sweeps start the same run from several workers or machines sharing one results folder,
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
two processes that both see the same stale lock cannot both win, and it is told on stderr in one
line (``creditaudit: took over run folder <path>: its process <pid> on this machine no longer
exists``). :func:`lock_state` asks the same questions without taking anything: whether a process
may still own a run folder (how reports tell a killed run from a running one).
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, NamedTuple

from .io import remove_partial_files

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]


def _say(message: str) -> None:
    """One plain line to stderr for the person running the command (not a warning: no source
    line or code in front of them)."""
    print(f"creditaudit: {message}", file=sys.stderr, flush=True)


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
    """Whether nobody holds an ``fcntl.flock`` on ``path`` (False if it cannot be checked).

    Asked with a *shared* flock, which fails only while the holder's exclusive one is held: two
    processes asking at once (two workers, or a report reading the folder) do not answer each
    other "held"."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
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
                _say(f"left {self.path} alone: it was removed or replaced while this process "
                     f"(pid {os.getpid()}) held it, so another process may own run folder "
                     f"{self.path.parent} now")
        finally:
            os.close(self._fd)  # closing also drops the flock; after the unlink on purpose
            self._fd = self._token = None

    # -- internals -----------------------------------------------------------------------------

    def _try_create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
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
            return f"its process {pid} on this machine no longer exists"
        if info.get("flock") and _flock_free(self.path):
            return (f"its process {pid} on this machine no longer holds its flock (the pid now "
                    "belongs to another process, or the process is a zombie)")
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
                _say(f"took over run folder {self.path.parent}: {reason}")
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
# Looking without taking
# ---------------------------------------------------------------------------------------------

class LockState(NamedTuple):
    """Whether a process may own a run folder, as :func:`lock_state` found it.

    ``owned``: True while ``run.lock`` names a process that may be alive (alive here, on another
    machine, container or boot, or a lock file not readable yet); False when there is no lock file
    or it is provably stale. ``detail``: who holds it, or why nobody does. ``exists``: whether
    there is a lock file.
    """
    owned: bool
    detail: str
    exists: bool


def lock_state(path: str | os.PathLike[str]) -> LockState:
    """Who owns the lock file ``path`` (a run folder's ``run.lock``), by the takeover rules of
    :class:`RunLock` but changing nothing: nothing is written, created or removed."""
    lock = RunLock(path)
    info = lock._read()
    if info is None and not lock.path.exists():
        return LockState(False, f"no process holds it (there is no {lock.path.name})", False)
    reason = lock._stale_reason(info)
    if reason is not None:
        return LockState(False, reason, True)
    return LockState(True, lock._describe(info), True)
