"""The exclusive lock on a run folder (``run.lock``), so that no run is trained twice at once.

Sweeps start the same run from several workers or machines sharing one results folder,
so ownership is a lock *file* created with ``O_CREAT | O_EXCL`` (atomic on local filesystems and
on NFSv3+). It holds one line of JSON: ``pid``, ``host`` (a hash of the hostname: lock files can be
left in a results folder that gets shared, so the hostname itself is not written), ``scope`` (a
hash of hostname, kernel boot id and pid namespace: within one scope a pid means one process),
``started``, a random ``token``, ``flock``, and the lease: ``renewed`` and ``lease_s``.

**When a lock is taken over.** Only when its holder is gone, by the first of these that tells:

* same scope, and the pid no longer exists;
* same scope, and — on POSIX, where the holder also keeps an ``fcntl.flock`` on the file —
  nobody holds the flock (the pid was reused, or the holder is a zombie). A held flock proves the
  holder alive, whatever its lease says;
* otherwise (another machine, container or boot; or this scope, a live pid and no flock to ask):
  its **lease** has run out. While it holds the lock, the holder renews the lease: a daemon
  thread, started by :meth:`RunLock.acquire` and stopped by :meth:`RunLock.release`, writes the
  time of its clock into ``renewed`` every ``lease_s / 10`` seconds. A lock whose ``renewed`` is
  more than ``lease_s`` old by the reader's clock is abandoned (its process or its node died: a
  lost Ray node, a killed container); one with a fresh lease is refused, saying when it runs out.

The lease is ``$CREDITAUDIT_LOCK_LEASE_S`` seconds (default 300, so renewed every 30 s), written
into the lock by its holder, whose promise it is: readers judge a lock by its own ``lease_s``.
Comparing two clocks assumes the machines' clocks agree to well within the lease (NTP keeps them
within a second or so); a lease of minutes also outlasts NFS attribute caching (up to a minute),
stalls of the process or the file server, and a few missed renewals.

The time is written *in the file*, not as its mtime: an mtime may be the file server's clock, is
cached by NFS clients, and is reset by copying a folder. A renewal rewrites the line in place
through the holder's own descriptor, at the same length (fixed-width milliseconds); replacing the
file by a rename would drop the holder's flock along with the old inode. A reader racing a renewal
may see a torn line, so a takeover reads the lock again under its guard and goes ahead only if it
is still the same expired lock. Before each renewal the holder reads the lock: when the file is
gone or holds another ``token`` (taken over while this process was stopped or cut off for longer
than its lease), it stops renewing, says so in one line on stderr and sets :attr:`RunLock.lost`.
It writes only through its own descriptor, so never over another process's lock; a failed write is
tried again at the next renewal, never raised into the run.

A lock written before leases (no ``renewed``) counts as renewed last at its ``started`` time, with
the reader's lease; one with no readable time is never taken over automatically. So a process of
an older creditaudit still training after its lease would lose its run: upgrade between sweeps.

Takeover is serialised by a ``run.lock.takeover`` directory (``mkdir`` is atomic everywhere), so
two processes that both see the same stale lock cannot both win, and it is told on stderr in one
line (``creditaudit: took over run folder <path>: its process <pid> on this machine no longer
exists``, ``... its process <pid> on another machine (host id <id>) has not renewed its lease for
<n> s (lease 300 s)``). :func:`lock_state` asks the same questions without taking anything: whether
a process may still own a run folder (how reports tell a killed run from a running one).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import sys
import threading
import uuid
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, NamedTuple

from creditaudit.errors import UserError

from .io import naming, remove_partial_files

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

LEASE_ENV = "CREDITAUDIT_LOCK_LEASE_S"
DEFAULT_LEASE_S = 300.0
RENEWALS_PER_LEASE = 10  # a holder renews every lease / 10: it must miss nine renewals to lose it


def say(message: str) -> None:
    """One plain line to stderr for the person running the command (not a warning: no source
    line or code in front of them)."""
    print(f"creditaudit: {message}", file=sys.stderr, flush=True)


class RunLockedError(UserError, RuntimeError):
    """Another process owns the run folder. ``str(err)`` says who and how to clear a stale lock."""

    def __init__(self, lock_path: str | os.PathLike[str], detail: str):
        self.lock_path = os.fspath(lock_path)
        self.detail = detail
        super().__init__(f"run folder {os.path.dirname(self.lock_path)} is locked: {detail}")

    def __reduce__(self):  # picklable (Ray ships exceptions by pickle)
        return (RunLockedError, (self.lock_path, self.detail))


class RunLockLost(RuntimeError):
    """This process lost the lock of the run folder it was training in (another took it over)."""

    def __init__(self, path: Any, why: str):
        super().__init__(
            f"stopped training in {path}: this process no longer holds its lock ({why}); "
            "the process that took it over trains the run"
        )


def lease_seconds() -> float:
    """The lease a holder takes: ``$CREDITAUDIT_LOCK_LEASE_S`` seconds, default 300.

    ValueError when the variable is set to anything but a number of seconds > 0."""
    raw = os.environ.get(LEASE_ENV, "").strip()
    if not raw:
        return DEFAULT_LEASE_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"${LEASE_ENV}={raw!r} is not a number of seconds > 0 (the lease on a run "
            f"folder's run.lock; unset it for the default, {DEFAULT_LEASE_S:g})"
        )
    return value


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


# ---------------------------------------------------------------------------------------------
# The lease
# ---------------------------------------------------------------------------------------------


def _stamp(t: datetime) -> str:
    """UTC, fixed width (``2026-01-01T12:00:00.000+00:00``): a renewal rewrites the line at its
    length."""
    return t.astimezone(timezone.utc).isoformat(timespec="milliseconds")


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        t = datetime.fromisoformat(value)
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


class Lease(NamedTuple):
    """A lock's lease as its file states it."""

    renewed: datetime  # the holder's last renewal; ``started`` for a lock written before leases
    seconds: float  # how long it lasts unrenewed
    legacy: bool  # no ``renewed`` field: a lock from before leases

    @property
    def expires(self) -> datetime:
        return self.renewed + timedelta(seconds=self.seconds)

    def age(self) -> float:
        """Seconds since the last renewal, by this machine's clock (negative when the holder's
        clock runs ahead)."""
        return (datetime.now(timezone.utc) - self.renewed).total_seconds()

    def expired(self) -> bool:
        return self.age() > self.seconds


def _lease(info: dict, default_s: float) -> Lease | None:
    """The lease of the lock ``info``, or None when it names no readable time. A lock without
    ``lease_s`` (written before leases, or edited) is judged by ``default_s``."""
    seconds = info.get("lease_s")
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, (int, float))
        or not (math.isfinite(seconds) and seconds > 0)
    ):
        seconds = default_s
    renewed = _parse_time(info.get("renewed"))
    if renewed is not None:
        return Lease(renewed, float(seconds), legacy=False)
    started = _parse_time(info.get("started"))
    return None if started is None else Lease(started, float(seconds), legacy=True)


def _rewrite(fd: int, info: dict) -> None:
    """Write ``info`` over the lock file's line through ``fd`` (the holder's own descriptor: the
    inode it created and flocked, never a file put there by someone else), then fsync."""
    data = (json.dumps(info) + "\n").encode()
    if hasattr(os, "pwrite"):
        written = os.pwrite(fd, data, 0)
    else:  # Windows
        os.lseek(fd, 0, os.SEEK_SET)
        written = os.write(fd, data)
    if written != len(data):
        raise OSError(f"wrote {written} of {len(data)} bytes")
    os.ftruncate(fd, len(data))  # a no-op at the same length
    os.fsync(fd)


# ---------------------------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------------------------


class RunLock:
    """Exclusive ownership of a run folder (see the module docstring for the protocol).

    Use as a context manager (``with folder.lock(): ...``) or call :meth:`acquire` /
    :meth:`release`. Not re-entrant: a second acquisition, even from the same process, raises
    :class:`RunLockedError`. Released on exit, exceptions included. ``clean``: folders whose
    ``.*.partial`` files (debris of atomic writes cut short by a crash) are deleted once held.
    ``lease_s``: the lease this holder takes, and the one a lock without ``lease_s`` is judged by
    (default :func:`lease_seconds`). ``lost``: why this process no longer holds the lock it
    acquired (found by the renewal), or None.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clean: Iterable[str | os.PathLike[str]] = (),
        lease_s: float | None = None,
    ):
        self.path = Path(path)
        self.clean = tuple(Path(p) for p in clean)  # folders to clear of .partial debris once held
        self.lease_s = lease_seconds() if lease_s is None else float(lease_s)
        if not (math.isfinite(self.lease_s) and self.lease_s > 0):
            raise ValueError(f"lease_s must be a number of seconds > 0, got {lease_s!r}")
        self.lost: str | None = None
        self._fd: int | None = None
        self._token: str | None = None
        self._renewal: threading.Thread | None = None
        self._stop = threading.Event()

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
            info = self._try_create()
            if info is not None:
                for folder in self.clean:
                    remove_partial_files(folder)
                self._start_renewal(info)
                return
            if not self.path.exists():  # released between our two looks: just try again
                continue
            info = self._read()
            if info is None or self._stale_reason(info) is None:
                raise RunLockedError(self.path, self._describe(info))
            self._take_over(info)
        raise RunLockedError(self.path, self._describe(self._read()))

    def release(self) -> None:
        if self._fd is None:
            return
        self._stop_renewal()
        try:
            info = self._read()
            if info is not None and info.get("token") == self._token:
                self.path.unlink(missing_ok=True)
            elif self.lost is None:  # the renewal has said it already otherwise
                say(
                    f"left {self.path} alone: it was removed or replaced while this process "
                    f"(pid {os.getpid()}) held it, so another process may own run folder "
                    f"{self.path.parent} now"
                )
        finally:
            os.close(self._fd)  # closing also drops the flock; after the unlink on purpose
            self._fd = self._token = None

    # -- internals -----------------------------------------------------------------------------

    def _try_create(self) -> dict | None:
        """The content of the lock file this call created, or None when one exists already."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
        except FileExistsError:
            return None
        flocked = False
        try:
            if fcntl is not None:
                try:  # before writing the content: a readable lock file implies a held flock
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    flocked = True
                except OSError:  # e.g. an NFS mount without lock support
                    flocked = False
            host, scope = _identity()
            now = datetime.now(timezone.utc)
            info: dict[str, Any] = {
                "pid": os.getpid(),
                "host": host,
                "scope": scope,
                "token": uuid.uuid4().hex,
                "flock": flocked,
                "started": now.isoformat(timespec="seconds"),
                "renewed": _stamp(now),
                "lease_s": self.lease_s,
            }
            with naming(self.path):  # a full disk: the one line names the lock file
                _rewrite(fd, info)
        except BaseException:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise
        self._fd, self._token = fd, info["token"]
        return info

    def _start_renewal(self, info: dict) -> None:
        self.lost = None
        self._stop = threading.Event()
        self._renewal = threading.Thread(
            target=self._renew,
            args=(self._fd, dict(info), self._stop),
            daemon=True,
            name=f"creditaudit lease on {self.path}",
        )
        self._renewal.start()

    def _stop_renewal(self) -> None:
        self._stop.set()
        if self._renewal is not None:
            self._renewal.join()  # at most one renewal in flight: no write after release
            self._renewal = None

    def _renew(self, fd: int, info: dict, stop: threading.Event) -> None:
        """The renewal thread: every ``lease_s / 10`` seconds, until ``stop``, check the lock is
        still ours (its token) and write the time into ``renewed``. Never raises."""
        every = self.lease_s / RENEWALS_PER_LEASE
        failing = False
        while not stop.wait(every):
            try:
                try:
                    current = json.loads(self.path.read_text())
                except (FileNotFoundError, ValueError):  # gone, or not our line (only we write it)
                    current = None
                if not isinstance(current, dict) or current.get("token") != info["token"]:
                    self.lost = (
                        f"its {self.path.name} was removed or replaced by another process "
                        f"while this process (pid {os.getpid()}) held it"
                    )
                    say(
                        f"lost run folder {self.path.parent}: {self.lost} (taken over, perhaps, "
                        f"after this process was stopped or cut off for longer than its lease of "
                        f"{self.lease_s:g} s); another process may own it now"
                    )
                    return
                info["renewed"] = _stamp(datetime.now(timezone.utc))
                _rewrite(fd, info)
                failing = False
            except Exception as exc:  # e.g. a file server away for a while: said once, tried again
                if not failing:
                    say(
                        f"could not renew the lease on {self.path} ({type(exc).__name__}: {exc}); "
                        f"trying again every {every:g} s"
                    )
                failing = True

    def _read(self) -> dict | None:
        """The lock file's content, or None if it is missing, empty or unparsable."""
        try:
            info = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) and isinstance(info.get("pid"), int) else None

    def _where(self, info: dict) -> str:
        host, scope = _identity()
        return (
            "this process"
            if info.get("scope") == scope and info["pid"] == os.getpid()
            else "this machine"
            if info.get("scope") == scope
            else "this host, another container or boot"
            if info.get("host") == host
            else f"another machine (host id {info.get('host')})"
        )

    def _lease_decides(self, info: dict) -> bool:
        """Whether only the lease can tell if the holder of ``info`` lives: it is in another scope,
        or in this one with no flock to check (and its pid exists)."""
        _, scope = _identity()
        return info.get("scope") != scope or not info.get("flock")

    def _stale_reason(self, info: dict | None) -> str | None:
        """Why the lock described by ``info`` is abandoned, or None if it may be live."""
        if info is None:  # being written right now, or its writer died before writing: unknown
            return None
        _, scope = _identity()
        pid = info["pid"]
        if info.get("scope") == scope:
            if not _pid_alive(pid):
                return f"its process {pid} on this machine no longer exists"
            if info.get("flock"):
                if _flock_free(self.path):
                    return (
                        f"its process {pid} on this machine no longer holds its flock (the pid "
                        "now belongs to another process, or the process is a zombie)"
                    )
                return None  # its flock is held: alive, whatever its lease says
        lease = _lease(info, self.lease_s)
        if lease is None or not lease.expired():
            return None
        counted = ", counted from its start: a lock from before leases" if lease.legacy else ""
        return (
            f"its process {pid} on {self._where(info)} has not renewed its lease for "
            f"{lease.age():.0f} s (lease {lease.seconds:g} s{counted})"
        )

    def _take_over(self, stale: dict) -> None:
        """Remove the stale lock ``stale`` unless someone replaced or renewed it meanwhile."""
        guard = self.path.with_name(self.path.name + ".takeover")
        try:
            os.mkdir(guard)
        except FileExistsError:
            raise RunLockedError(
                self.path,
                f"another process is taking over a stale lock right now. If none is "
                f"(a crash mid-takeover), delete the folder {guard} and retry",
            ) from None
        try:
            current = self._read()  # again: a holder may have renewed, or a read have been torn
            if current is not None and current.get("token") == stale.get("token"):
                reason = self._stale_reason(current)
                if reason is not None:
                    self.path.unlink(missing_ok=True)
                    say(f"took over run folder {self.path.parent}: {reason}")
        finally:
            os.rmdir(guard)

    def _describe(self, info: dict | None) -> str:
        clear = f"if no process is running this run any more, delete {self.path} and retry"
        if info is None:
            return (
                f"{self.path} exists but holds no readable owner (being created right now, "
                f"or left by a process that died while creating it); {clear}"
            )
        where = self._where(info)
        held = f"held by pid {info['pid']} on {where} since {info.get('started', '?')}"
        if where == "this process" or not self._lease_decides(info):
            return f"{held}; wait for it to finish, or {clear}"
        lease = _lease(info, self.lease_s)
        if lease is None:
            return (
                f"{held}, with no time of renewal (so it is never taken over automatically); "
                f"wait for it to finish, or {clear}"
            )
        left = max(0.0, lease.seconds - lease.age())
        return (
            f"{held}; its lease runs out at {lease.expires:%Y-%m-%d %H:%M:%S} UTC (in "
            f"{left:.0f} s) unless its holder renews it, and the run is then taken over by "
            f"the next attempt; wait for it to finish, or {clear}"
        )


# ---------------------------------------------------------------------------------------------
# Looking without taking
# ---------------------------------------------------------------------------------------------


class LockState(NamedTuple):
    """Whether a process may own a run folder, as :func:`lock_state` found it.

    ``owned``: True while ``run.lock`` names a process that may be alive (alive here, or
    elsewhere with a lease not run out yet, or a lock file not readable yet); False when there is
    no lock file or it is stale. ``detail``: who holds it, or why nobody does. ``exists``: whether
    there is a lock file.
    """

    owned: bool
    detail: str
    exists: bool


def lease_left(path: str | os.PathLike[str]) -> float | None:
    """Seconds until the lease of the lock file ``path`` runs out, when only its lease can tell
    whether its holder lives (a process on another machine, container or boot); None when there is
    no such lock (none, a stale one, or one whose holder this machine can see). Changes nothing."""
    lock = RunLock(path)
    info = lock._read()
    if info is None or lock._stale_reason(info) is not None or not lock._lease_decides(info):
        return None
    lease = _lease(info, lock.lease_s)
    return None if lease is None else max(0.0, lease.seconds - lease.age())


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
