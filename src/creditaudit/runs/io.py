"""Crash-safe file I/O for run folders: atomic writes, append-only JSON lines, and their errors.

A run can be killed at any instant (SIGKILL, OOM, a pre-empted cluster node), so every file in a
run folder is written in one of two crash-safe ways:

* **Atomic replace** (``atomic_write_text`` / ``_json`` / ``_bytes``, ``rewrite_jsonl``): the new
  content goes to a temporary file in the *same* folder (same filesystem, so the rename is atomic),
  is flushed and ``fsync``-ed, then ``os.replace``-d over the target, and the folder itself is
  ``fsync``-ed where the OS allows it so the rename survives a power cut. A reader sees the old
  content or the new content, never a mix. The temporary file is named
  ``.<target>.<random>.partial``; a process killed mid-write can leave one behind, and
  :func:`remove_partial_files` (called by ``RunFolder.lock()``) clears them once the folder is
  owned again.
* **Append** (``append_jsonl``): one JSON object per line, flushed and ``fsync``-ed per record. A
  crash mid-append can leave a *torn last line*; readers skip it (:func:`read_jsonl`) and the next
  append repairs it. A bad line anywhere else is real corruption and raises
  :class:`CorruptRunError`.

JSON conventions (one place, so summaries, configs and metrics agree): non-finite floats (NaN,
±inf: a diverged loss) are written as ``null`` because strict JSON has no NaN and other tools
(``jq``, browsers, pandas' strict mode) reject Python's ``NaN`` token; numpy scalars and arrays,
torch tensors (via ``.tolist()``), tuples and ``os.PathLike`` values are converted to their plain
JSON equivalents. Anything else raises ``TypeError`` naming where in the object it sits.

Errors: an ``OSError`` of a write (no space left, permission denied, a read-only file system) is
re-raised naming the file written (``filename``), never its temporary sibling, so the CLI's one line
for it names a path the user knows; the target keeps its old content. :class:`CorruptRunError` is a
:class:`~creditaudit.errors.UserError`.

File modes: every file written here gets the mode a plain ``open(path, "w")`` would give it,
``0o666 & ~umask`` (and the folder's default ACL, where it has one), so a results folder shared
between users or the nodes of a cluster is readable by whom the umask allows. The temporary file of
an atomic replace is created with ``os.open(..., 0o666)`` before the writer runs, and its mode is
put back after the writer is done: writers that create their own file (``safetensors`` writes
owner-only ``0o600`` files, as ``tempfile.mkstemp`` does) would otherwise make the result private.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import stat
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from creditaudit.errors import UserError

__all__ = [
    "PARTIAL_SUFFIX",
    "CorruptRunError",
    "append_jsonl",
    "atomic_replace",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "fsync_dir",
    "naming",
    "partial_path",
    "read_jsonl",
    "read_jsonl_checked",
    "remove_partial_files",
    "rewrite_jsonl",
    "to_jsonable",
]

PARTIAL_SUFFIX = ".partial"
"""Suffix of the temporary files that atomic writes rename over their target."""

_DEFAULT_FIX = "repair or delete the file; deleting the run folder reruns the run from scratch"


class CorruptRunError(UserError):
    """A run-folder file that exists but cannot be trusted (unparsable, truncated, wrong format).

    ``str(err)`` names the file (and line, for JSON lines), what is wrong, and how to fix it.
    Attributes: ``path`` (str), ``reason``, ``line`` (1-based, or None), ``fix``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        reason: str,
        *,
        line: int | None = None,
        fix: str | None = None,
    ):
        self.path = os.fspath(path)
        self.reason = reason
        self.line = line
        self.fix = fix or _DEFAULT_FIX
        where = self.path if line is None else f"{self.path}, line {line}"
        super().__init__(f"{where}: {reason}. Fix: {self.fix}.")

    def __reduce__(self):  # picklable with its keyword arguments (Ray ships exceptions by pickle)
        return (_rebuild_corrupt_run_error, (self.path, self.reason, self.line, self.fix))


def _rebuild_corrupt_run_error(
    path: str, reason: str, line: int | None, fix: str
) -> CorruptRunError:
    return CorruptRunError(path, reason, line=line, fix=fix)


# ---------------------------------------------------------------------------------------------
# JSON conversion
# ---------------------------------------------------------------------------------------------


def to_jsonable(obj: Any, _where: str = "$") -> Any:
    """Return ``obj`` as plain JSON types, with non-finite floats replaced by ``None``.

    dict keys must be str, int, float or bool (``json`` turns the last three into strings);
    tuples become lists; numpy scalars/arrays and torch tensors become Python numbers/lists;
    ``os.PathLike`` becomes its string. Raises ``TypeError`` with a JSON-path-like location for
    anything else, so a stray object in a summary fails where it was put, not deep inside ``json``.
    """
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, (str, int, float, bool)):
                raise TypeError(
                    f"{_where}: dict key {key!r} of type {type(key).__name__} "
                    "is not JSON-serialisable"
                )
            out[key] = to_jsonable(value, f"{_where}[{key!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, f"{_where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (np.generic, np.ndarray)):
        return to_jsonable(obj.tolist(), _where)
    torch = sys.modules.get("torch")  # a tensor can only exist if torch is already imported
    if torch is not None and isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist(), _where)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{_where}: object of type {type(obj).__name__} is not JSON-serialisable")


def _dumps_line(record: Mapping[str, Any]) -> str:
    """One compact JSON line (no trailing newline); key order kept as the caller wrote it."""
    if not isinstance(record, Mapping):
        raise TypeError(f"a JSON-lines record must be a dict, got {type(record).__name__}")
    return json.dumps(
        to_jsonable(record), allow_nan=False, ensure_ascii=False, separators=(",", ":")
    )


# ---------------------------------------------------------------------------------------------
# Atomic replace
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def naming(path: str | os.PathLike[str]) -> Iterator[None]:
    """An ``OSError`` raised inside without a file name (``write`` and ``fsync`` on a full disk)
    names ``path``, so the one line the CLI prints for it says which file (``errors.py``)."""
    try:
        yield
    except OSError as exc:
        if exc.errno is not None and exc.filename is None:
            exc.filename = os.fspath(path)
        raise


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """``fsync`` a directory so a rename in it is durable; a no-op where unsupported (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and Windows) refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def partial_path(path: str | os.PathLike[str]) -> Path:
    """A fresh temporary path beside ``path``: ``.<name>.<random hex>.partial``, same folder."""
    path = Path(path)
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}")


@contextlib.contextmanager
def atomic_replace(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on a clean exit it is ``fsync``-ed and renamed
    over ``path`` (parent folders are created, the folder is ``fsync``-ed after the rename).

    The yielded file already exists, empty, with the mode of a newly created file
    (``0o666 & ~umask``); the writer may truncate it or replace it with a file of its own, whose
    mode is then set back to that one, so every result file is as readable as its folder's umask
    allows.

    After a crash at any point the target holds its old content (or does not exist, if it did not
    before) or the new content in full. On failure the temporary file is removed and the error
    re-raised; an ``OSError`` (no space left, permission denied) names ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        # Created here, so its mode is what the umask (and a default ACL) makes of 0o666; the
        # writer may replace the file by one of its own making (safetensors: 0o600), so the mode
        # is put back before the rename.
        os.close(
            os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        )
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        yield tmp
        fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        try:
            if stat.S_IMODE(os.fstat(fd).st_mode) != mode:
                os.chmod(tmp, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if (
            isinstance(exc, OSError)
            and exc.errno is not None
            and exc.filename in (None, os.fspath(tmp))
        ):
            exc.filename, exc.filename2 = (
                os.fspath(path),
                None,
            )  # the file the user knows of, not its temporary sibling
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically; see :func:`atomic_replace`."""
    with (
        atomic_replace(path) as tmp,
        open(tmp, "wb") as f,
    ):  # the empty file atomic_replace created, with its mode
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically; see :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as pretty JSON (indent 2, sorted keys, trailing newline) atomically.

    Non-finite floats become ``null`` and numpy/torch values plain numbers (:func:`to_jsonable`),
    so the file is strict JSON that any tool can read.
    """
    text = json.dumps(
        to_jsonable(obj), indent=2, sort_keys=True, allow_nan=False, ensure_ascii=False
    )
    atomic_write_text(path, text + "\n")


def remove_partial_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete the debris of interrupted atomic writes (``.*.partial``) directly in ``directory``.

    Only safe when no other process is writing there (``RunFolder.lock()`` calls it after taking
    the lock). Returns the removed paths; a missing folder is not an error.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for p in directory.glob(f".*{PARTIAL_SUFFIX}"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# ---------------------------------------------------------------------------------------------
# JSON lines
# ---------------------------------------------------------------------------------------------


def append_jsonl(path: str | os.PathLike[str], record: Mapping[str, Any]) -> None:
    """Append ``record`` as one JSON line and ``fsync`` it (parent folders are created).

    If the file ends in a torn line (a crash mid-append), the fragment is first cut off (or, if it
    is a complete record that only lacks its newline, terminated), so a torn line never ends up in
    the middle of the file where :func:`read_jsonl` would have to call it corruption.
    """
    path = Path(path)
    line = (_dumps_line(record) + "\n").encode("utf-8")
    with naming(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a+b") as f:
            end = f.seek(0, os.SEEK_END)
            if end > 0:
                f.seek(end - 1)
                if f.read(1) != b"\n":
                    _repair_torn_tail(f, end)
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def _repair_torn_tail(f, end: int) -> None:
    """Terminate or cut the unterminated last line of the open file ``f`` (size ``end``)."""
    # Find the start of the last line; scan back in chunks (metrics lines are short).
    start, pos = 0, end
    while pos > 0:
        step = min(4096, pos)
        f.seek(pos - step)
        chunk = f.read(step)
        nl = chunk.rfind(b"\n")
        if nl >= 0:
            start = pos - step + nl + 1
            break
        pos -= step
    f.seek(start)
    if _parse_line(f.read(end - start)) is not None:
        f.seek(end)
        f.write(b"\n")  # a whole record missing only its newline: keep it
    else:
        f.truncate(start)  # in "a" mode the next write still goes to the (new) end
    f.seek(0, os.SEEK_END)


def _parse_line(raw: bytes) -> dict | None:
    """The record on one line, or None if the line is not a complete JSON object."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_jsonl_checked(path: str | os.PathLike[str]) -> tuple[list[dict], int]:
    """Read a JSON-lines file; return ``(records, n_bad)``.

    Blank lines are ignored. The last non-blank line may be torn (a crash mid-append, or a writer
    appending right now): it is skipped and counted in ``n_bad`` (so ``n_bad`` is 0 or 1). A bad
    line before it raises :class:`CorruptRunError` naming the line. ``FileNotFoundError`` if the
    file does not exist.
    """
    path = Path(path)
    lines = path.read_bytes().split(b"\n")
    numbered = [(i + 1, raw) for i, raw in enumerate(lines) if raw.strip()]
    records: list[dict] = []
    n_bad = 0
    for k, (lineno, raw) in enumerate(numbered):
        record = _parse_line(raw)
        if record is not None:
            records.append(record)
        elif k == len(numbered) - 1:
            n_bad = 1
        else:
            raise CorruptRunError(
                path,
                "not a JSON object (a corrupt line in the middle of the file)",
                line=lineno,
                fix="delete or repair that line, or delete the run folder to rerun it from scratch",
            )
    return records, n_bad


def read_jsonl(path: str | os.PathLike[str]) -> list[dict]:
    """The records of a JSON-lines file, silently skipping a torn last line.

    See :func:`read_jsonl_checked` for the rules and for a count of skipped lines.
    """
    return read_jsonl_checked(path)[0]


def rewrite_jsonl(path: str | os.PathLike[str], records: Iterable[Mapping[str, Any]]) -> None:
    """Atomically replace ``path`` with exactly ``records`` (used on resume to drop lines logged
    after the checkpoint being resumed from)."""
    text = "".join(_dumps_line(r) + "\n" for r in records)
    atomic_write_text(path, text)
