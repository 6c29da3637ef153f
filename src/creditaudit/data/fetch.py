"""Downloads with checksum verification, and the public ``check_dataset`` / ``fetch_dataset``.

Owns the only code in the package that touches the network: :func:`download_url` (urllib, short
socket timeout, no retries) and :func:`fetch_files`, which downloads each missing file to a
temporary name, verifies its published digest and only then renames it into place — so a failed
or tampered download never leaves a file that a later run would trust. Offline, the error lists
exactly which files to put where.

Tests replace :func:`download_url` (``monkeypatch.setattr(fetch, "download_url", ...)``); every
download goes through that one name.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from creditaudit.data.base import (
    DATASETS,
    SOURCES,
    DatasetMissingError,
    file_digest,
    resolve_data_dir,
)

DOWNLOAD_TIMEOUT_S = 20.0  # per socket operation, not per file: a dead host fails fast


@dataclass(frozen=True)
class RemoteFile:
    """One published file: its name on disk, where to get it, and its published digest."""

    name: str  # file name inside <data_dir>/<dataset>/
    url: str
    digest: str  # hex
    algo: str  # "sha256" | "md5"


def download_url(url: str, dest: str, *, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Stream ``url`` into the file ``dest`` (overwritten). Raises OSError/URLError on failure."""
    request = urllib.request.Request(url, headers={"User-Agent": "creditaudit"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as out:
        shutil.copyfileobj(response, out, 1 << 20)


def manual_instructions(target: Path, files: list[RemoteFile], extra: str = "") -> str:
    """The "do it by hand" paragraph: which files, from where, into which folder."""
    lines = [f"Place these files in {target}/ (download them on a machine with network access):"]
    lines += [f"  {f.name}  <- {f.url}  ({f.algo} {f.digest})" for f in files]
    if extra:
        lines.append(extra)
    return "\n".join(lines)


def fetch_files(
    target: Path,
    files: list[RemoteFile],
    *,
    dataset: str,
    quiet: bool = False,
    extra_hint: str = "",
) -> None:
    """Download every file of ``files`` not already in ``target``, verifying its digest.

    Files already present are trusted (loaders validate their structure). A download that fails
    or does not match its digest is deleted and raises :class:`DatasetMissingError`.
    """
    target.mkdir(parents=True, exist_ok=True)
    missing = [f for f in files if not (target / f.name).exists()]
    for remote in missing:
        final = target / remote.name
        tmp = target / f".{remote.name}.{os.getpid()}.partial"
        if not quiet:
            print(f"[creditaudit] downloading {remote.url} -> {final}", file=sys.stderr)
        try:
            try:
                download_url(remote.url, str(tmp))
            except (urllib.error.URLError, OSError, TimeoutError) as err:
                raise DatasetMissingError(
                    f"could not download {dataset} file {remote.name} from {remote.url} ({err}).\n"
                    + manual_instructions(target, missing, extra_hint)
                ) from err
            got = file_digest(tmp, remote.algo)
            if got != remote.digest:
                raise DatasetMissingError(
                    f"checksum mismatch for {remote.url}: expected {remote.algo} {remote.digest}, got {got}; "
                    f"the download was discarded (nothing saved in {target}). Retry later, or\n"
                    + manual_instructions(target, [remote], extra_hint)
                )
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if not quiet:
            print(f"[creditaudit] verified {remote.algo} of {final.name}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def check_dataset(name: str, data_dir: str = "") -> str | None:
    """Where ``name`` would be read from (a path or a short description), or None if missing.

    Never touches the network. Always truthy for the offline datasets (digits, student, and
    mnist1d when the ``mnist1d`` package is installed). Unknown names raise ``UnknownNameError``.
    """
    DATASETS.get(name)  # the registry's helpful error for typos
    return SOURCES.get(name).locate(resolve_data_dir(data_dir))


def fetch_dataset(name: str, data_dir: str = "", *, quiet: bool = False) -> str:
    """Make ``name`` present under ``<data_dir>/<name>/`` and return where it is read from.

    Downloads (with checksum verification) only what is missing and not found in a system
    location; offline datasets are built or located. Raises :class:`DatasetMissingError` naming
    the manual fix when that is impossible.
    """
    DATASETS.get(name)
    return SOURCES.get(name).fetch(resolve_data_dir(data_dir), quiet=quiet)
