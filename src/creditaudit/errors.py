"""Errors a user can act on, and the one line each becomes on the command line.

:class:`UserError` is the one base class of every error whose cause the user can fix: a bad config
key or value (:class:`ConfigError`), an unknown name (``registry.UnknownNameError``), a missing
dataset (``data.DatasetMissingError``), a run folder held by another process
(``runs.lock.RunLockedError``), holding another config (``runs.folder.RunConfigMismatch``) or
corrupt (``runs.io.CorruptRunError``), a path given that is not there (:class:`MissingPathError`).
Each is raised where its cause is known, and its message is one line naming what is wrong and the
fix. This module imports nothing, so every layer may raise them (the generic config engine too).

The operating system's errors about a path — permission denied, no space left (``ENOSPC``,
``EDQUOT``), a read-only file system, a file where a folder belongs or the reverse, a name too
long, a path that is not there — and a file that is not UTF-8 text come from deep inside ``open``
and ``mkdir``, wherever a file is written or read; :func:`user_message` says them as one line
naming the path and the fix. The CLI does that at its edge (``cli.friendly_errors``, around every
command): one line on stderr, no traceback, exit status 2. Every write of a run folder or a report
is atomic or append-only (``runs/io.py``), so such an error loses nothing already computed.
"""

from __future__ import annotations

import errno

__all__ = ["ConfigError", "MissingPathError", "UserError", "user_message"]


class UserError(Exception):
    """An error the user can act on. ``str()`` is one line: what is wrong and the fix; the CLI
    prints it without a traceback and exits with status 2."""


class ConfigError(UserError, ValueError):
    """A bad config key or value, or a combination a run cannot start with; the message says which
    and what is allowed."""


class MissingPathError(UserError, FileNotFoundError):
    """A file or folder the user named (a results folder, a run folder, a checkpoint) is not there;
    the message names it and what to give instead."""


# errno -> (what happened, the fix), for the errors of a path the user chose.
_WRITE_ELSEWHERE = "or write elsewhere (results=DIR, --out PATH)"
_OS_ERRORS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", f"free some space there {_WRITE_ELSEWHERE}"),
    errno.EACCES: ("permission denied", f"make it accessible to you {_WRITE_ELSEWHERE}"),
    errno.EPERM: ("operation not permitted", f"make it accessible to you {_WRITE_ELSEWHERE}"),
    errno.EROFS: ("the file system is read-only", "write elsewhere (results=DIR, --out PATH)"),
    errno.ENOTDIR: (
        "a part of this path is a file, not a folder",
        "name a folder (results=DIR, --out PATH) or move that file",
    ),
    errno.EISDIR: (
        "a folder, where a file belongs",
        "name a file (e.g. --out FILE) or move that folder",
    ),
    errno.ENAMETOOLONG: (
        "a name in this path is too long for the file system",
        "use shorter names (results=, setting=, arch_label=, --out)",
    ),
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.EEXIST: ("exists already, where a folder is to be made", "move it or name another path"),
}
if hasattr(errno, "EDQUOT"):  # not on Windows
    _OS_ERRORS[errno.EDQUOT] = (
        "the disk quota is used up",
        f"free some space there {_WRITE_ELSEWHERE}",
    )

_KEPT = "; what was computed is kept and the same command resumes"


def user_message(exc: BaseException) -> str | None:
    """The one line the CLI prints for ``exc``, or None when it is not an error the user can act on
    (a bug: its traceback is what helps)."""
    if isinstance(exc, UserError):
        text = str(exc)
    elif isinstance(exc, UnicodeDecodeError):
        text = (
            f"a file is not UTF-8 text ({exc.reason} at byte {exc.start}); "
            "fix or delete the file (a run folder's files are JSON, written as UTF-8)"
        )
    elif isinstance(exc, OSError) and exc.errno in _OS_ERRORS:
        what, fix = _OS_ERRORS[exc.errno]
        path = exc.filename if exc.filename is not None else "a file"
        also = f" -> {exc.filename2}" if exc.filename2 is not None else ""
        kept = _KEPT if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) else ""
        text = f"{path}{also}: {what}; {fix}{kept}"
    else:
        return None
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())
