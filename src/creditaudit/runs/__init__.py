"""Run folders: the on-disk record of one training run, and the only place runs are read from.

``io``          crash-safe writes (atomic replace, fsync-ed JSON lines) and ``CorruptRunError``
``checkpoint``  nested training state <-> safetensors (never pickle / ``torch.load``)
``provenance``  versions, device and git state recorded in every summary
``folder``      run names, ``RunFolder`` (config / metrics / summary / checkpoints), ``run.lock``

Reports and the sweep runner read results through this package alone, so it imports nothing
from the rest of ``creditaudit`` (only the package's version and location, for provenance).

The function ``provenance()`` is not re-exported: ``creditaudit.runs.provenance`` stays the
submodule, so it means one thing (``from creditaudit.runs.provenance import provenance``).
"""
from __future__ import annotations

from . import provenance  # the module; ``provenance.provenance()`` is the function
from .checkpoint import (load_checkpoint, load_tensors, pack_state, save_checkpoint, save_tensors,
                         unpack_state)
from .folder import (RUN_STATUSES, RunFolder, RunLock, RunLockedError, parse_run_name, run_dir,
                     run_name)
from .io import (CorruptRunError, append_jsonl, atomic_write_bytes, atomic_write_json,
                 atomic_write_text, read_jsonl, read_jsonl_checked, rewrite_jsonl, to_jsonable)

__all__ = [
    "RUN_STATUSES",
    "CorruptRunError",
    "RunFolder",
    "RunLock",
    "RunLockedError",
    "append_jsonl",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "load_checkpoint",
    "load_tensors",
    "pack_state",
    "parse_run_name",
    "read_jsonl",
    "read_jsonl_checked",
    "rewrite_jsonl",
    "run_dir",
    "run_name",
    "save_checkpoint",
    "save_tensors",
    "to_jsonable",
    "unpack_state",
]
