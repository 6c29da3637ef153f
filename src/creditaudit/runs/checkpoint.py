"""Checkpoints as safetensors files: nested training state in, the same nested state out.

A checkpoint must hold everything a killed run needs to continue bit-for-bit: model and rule
state dicts, optimizer state dicts (whose ``state`` is keyed by *int* parameter indices), and the
RNG states of torch, numpy and ``random`` (a ByteTensor, a tuple holding a uint32 ndarray, a tuple
of ints). safetensors stores only a flat ``str -> tensor`` map plus a ``str -> str`` header, and
it never executes code on load — which is why this package never uses pickle or ``torch.load``.

:func:`pack_state` splits a nested object into

* ``tensors``: every tensor, detached, cloned to CPU and made contiguous, under a unique flat key
  derived from its path (``"model/blocks.0.fc1.weight"``, ``"optimizer/state/3/exp_avg"``);
* ``skeleton``: a JSON-able tree that mirrors the object with each tensor replaced by a reference.

Skeleton grammar (every JSON *object* in a skeleton is a tagged node, so tags cannot collide with
user data, which is encoded as ``__dict__`` pairs)::

    null | true | false | <int> | <finite float> | <str>   the value itself
    [node, ...]                                          list
    {"__tuple__": [node, ...]}                           tuple (tuple subclasses such as
                                                         torch.Size come back as plain tuples)
    {"__dict__": [[key, node], ...]}                     dict; key is a str or an int and stays
                                                         one (a JSON pair keeps 3 apart from "3");
                                                         insertion order kept
      + "ordered": true                                  was a collections.OrderedDict
      + "_metadata": node                                the ``_metadata`` attribute that
                                                         ``Module.state_dict()`` attaches (module
                                                         versions read by ``load_state_dict``)
    {"__tensor__": "<flat key>"}                         torch.Tensor
    {"__ndarray__": "<flat key>", "dtype": "<u4",        numpy array (or numpy scalar, with
     "shape": [624], "scalar": false}                    "scalar": true), stored as its raw bytes
                                                         in a uint8 tensor: exact for every dtype
    {"__float__": "nan" | "inf" | "-inf"}                non-finite float (strict JSON has none)

Finite floats survive JSON exactly (``repr`` round-trips), and ints of any size are exact.

:func:`save_checkpoint` writes the tensors with ``safetensors.torch.save_file`` to a temporary
file in the target's folder, ``fsync``-s it and renames it over the target, so a crash leaves the
previous checkpoint intact. The header metadata holds ``creditaudit.format`` (``"1"``),
``creditaudit.skeleton`` and ``creditaudit.meta`` (JSON strings); ``meta`` is for humans and tools
(epoch, provenance) and follows the run folder's JSON conventions (non-finite -> null).

Limits, by design: tensors come back detached (``requires_grad`` is not stored), and aliasing is
not preserved — two entries that shared storage (tied weights) are stored and restored as two
independent copies, which is what ``load_state_dict`` expects anyway. Sparse, quantized and other
non-strided tensors are refused. safetensors checks a file's structure, not a checksum of its
data: truncation and garbage are detected, a flipped bit inside a tensor is not.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch

from .io import CorruptRunError, atomic_replace, to_jsonable

__all__ = [
    "CHECKPOINT_FORMAT",
    "load_checkpoint",
    "load_tensors",
    "pack_state",
    "save_checkpoint",
    "save_tensors",
    "unpack_state",
]

CHECKPOINT_FORMAT = "1"
_KEY_FORMAT = "creditaudit.format"
_KEY_SKELETON = "creditaudit.skeleton"
_KEY_META = "creditaudit.meta"
_CHECKPOINT_FIX = "delete it to restart the run from scratch"


# ---------------------------------------------------------------------------------------------
# pack / unpack
# ---------------------------------------------------------------------------------------------


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    """A detached, contiguous CPU copy owning its storage (safetensors refuses shared storage)."""
    if t.layout != torch.strided or t.is_quantized or t.device.type == "meta":
        raise TypeError(f"cannot checkpoint a {t.layout} / quantized / meta tensor")
    return t.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)


class _Packer:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def _key(self, path: tuple[str, ...]) -> str:
        base = "/".join(path) or "tensor"
        key, n = base, 1
        while key in self.tensors:  # a str key containing "/" can imitate a nested path
            key, n = f"{base}~{n}", n + 1
        return key

    def pack(self, obj: Any, path: tuple[str, ...]) -> Any:
        # bool before int (bool is an int); numpy scalars before float (np.float64 is a float)
        if obj is None or isinstance(obj, (bool, str)):
            return obj
        if isinstance(obj, (np.generic, np.ndarray)):
            arr = np.asarray(obj)
            if arr.dtype.hasobject:
                raise TypeError(f"{_where(path)}: numpy arrays of Python objects cannot be stored")
            key = self._key(path)
            raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8).copy()
            self.tensors[key] = torch.from_numpy(raw)
            return {
                "__ndarray__": key,
                "dtype": arr.dtype.str,
                "shape": list(arr.shape),
                "scalar": isinstance(obj, np.generic),
            }
        if isinstance(obj, int):
            return int(obj)
        if isinstance(obj, float):
            if math.isfinite(obj):
                return float(obj)
            return {"__float__": "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")}
        if isinstance(obj, torch.Tensor):
            key = self._key(path)
            try:
                self.tensors[key] = _cpu_copy(obj)
            except TypeError as e:
                raise TypeError(f"{_where(path)}: {e}") from None
            return {"__tensor__": key}
        if isinstance(obj, Mapping):
            pairs = []
            for k, v in obj.items():
                if isinstance(k, bool) or not isinstance(k, (str, int)):
                    raise TypeError(
                        f"{_where(path)}: dict key {k!r} ({type(k).__name__}) is not a str or int"
                    )
                pairs.append([k if isinstance(k, str) else int(k), self.pack(v, path + (str(k),))])
            node: dict[str, Any] = {"__dict__": pairs}
            if isinstance(obj, OrderedDict):
                node["ordered"] = True
            metadata = getattr(obj, "_metadata", None)
            if isinstance(metadata, Mapping):
                node["_metadata"] = self.pack(metadata, path + ("_metadata",))
            return node
        if isinstance(obj, list):
            return [self.pack(v, path + (str(i),)) for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            return {"__tuple__": [self.pack(v, path + (str(i),)) for i, v in enumerate(obj)]}
        raise TypeError(
            f"{_where(path)}: cannot checkpoint an object of type "
            f"{type(obj).__module__}.{type(obj).__qualname__}; convert it to tensors, "
            "numbers, strings, lists, tuples or dicts first"
        )


def _where(path: tuple[str, ...]) -> str:
    return "state" + "".join(f"[{p!r}]" for p in path)


def pack_state(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state into ``(tensors, skeleton)``; see the module docstring for the format.

    ``tensors`` maps unique flat keys to detached, contiguous CPU copies; ``skeleton`` is JSON-able
    (``json.dumps(skeleton, allow_nan=False)`` succeeds). Raises ``TypeError`` naming the location
    of any value it cannot store.
    """
    packer = _Packer()
    skeleton = packer.pack(obj, ())
    return packer.tensors, skeleton


def unpack_state(
    tensors: Mapping[str, torch.Tensor], skeleton: Any, device: str | torch.device | None = None
) -> Any:
    """Rebuild the object that :func:`pack_state` split; tensors are moved to ``device`` if given.

    numpy arrays always come back on the host. RNG states must stay on the CPU
    (``torch.set_rng_state`` takes a CPU ByteTensor), so load with ``device=None`` when the state
    holds them and let ``load_state_dict`` place model and optimizer tensors. Raises ``KeyError``
    for a reference to a missing tensor and ``ValueError`` for a malformed skeleton.
    """
    dev = torch.device(device) if device is not None else None

    def walk(node: Any) -> Any:
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            return [walk(v) for v in node]
        if not isinstance(node, dict):
            raise ValueError(f"malformed checkpoint skeleton node of type {type(node).__name__}")
        if "__tensor__" in node:
            t = tensors[node["__tensor__"]]
            return t.to(dev) if dev is not None else t
        if "__dict__" in node:
            items = [(k, walk(v)) for k, v in node["__dict__"]]
            out: dict = OrderedDict(items) if node.get("ordered") else dict(items)
            if "_metadata" in node:
                # OrderedDict instances take attributes; a plain dict does not
                out = OrderedDict(out) if not isinstance(out, OrderedDict) else out
                out._metadata = walk(node["_metadata"])  # type: ignore[attr-defined]
            return out
        if "__tuple__" in node:
            return tuple(walk(v) for v in node["__tuple__"])
        if "__ndarray__" in node:
            raw = tensors[node["__ndarray__"]].detach().cpu().numpy()
            arr = raw.view(np.dtype(node["dtype"])).reshape(node["shape"]).copy()
            return arr[()] if node.get("scalar") else arr
        if "__float__" in node:
            return float(node["__float__"])
        raise ValueError(f"malformed checkpoint skeleton node with keys {sorted(node)}")

    return walk(skeleton)


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


def _atomic_save_file(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None
) -> None:
    """``safetensors.torch.save_file`` to a temporary sibling, fsync, rename over ``path``. An I/O
    error of safetensors (its own exception type, ``... (os error 28)``) is raised as the
    ``OSError`` it is, naming ``path`` (a full disk reads as one line on the command line)."""
    with atomic_replace(path) as tmp:
        try:
            safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
        except safetensors.SafetensorError as exc:
            code = re.search(r"\(os error (\d+)\)", str(exc))
            if code is None:
                raise
            raise OSError(
                int(code.group(1)), os.strerror(int(code.group(1))), os.fspath(path)
            ) from exc


def save_checkpoint(
    path: str | os.PathLike[str], state: Mapping[str, Any], meta: Mapping[str, Any] | None = None
) -> None:
    """Atomically write ``state`` (any nested structure :func:`pack_state` accepts, with a dict at
    the top) and the JSON-able ``meta`` to the safetensors file ``path``."""
    if not isinstance(state, Mapping):
        raise TypeError(f"checkpoint state must be a dict, got {type(state).__name__}")
    tensors, skeleton = pack_state(state)
    metadata = {
        _KEY_FORMAT: CHECKPOINT_FORMAT,
        _KEY_SKELETON: json.dumps(skeleton, allow_nan=False, separators=(",", ":")),
        _KEY_META: json.dumps(to_jsonable(dict(meta or {})), allow_nan=False, sort_keys=True),
    }
    _atomic_save_file(Path(path), tensors, metadata)


def _read_safetensors(path: Path, fix: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (on the CPU) and the header metadata of a safetensors file.

    Raises CorruptRunError (with ``fix``) if the file is missing or unreadable.
    """
    if not path.is_file():
        raise CorruptRunError(path, "file is missing", fix=fix)
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (a safe_open handle, not a dict)
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CorruptRunError(path, f"not a readable safetensors file ({e})", fix=fix) from e
    return tensors, metadata


def load_checkpoint(
    path: str | os.PathLike[str], device: str | torch.device | None = None
) -> tuple[dict, dict]:
    """Read a checkpoint written by :func:`save_checkpoint`; return ``(state, meta)``.

    Tensors are loaded on the CPU, then moved to ``device`` if given (see :func:`unpack_state`).
    A missing, truncated or foreign file raises :class:`CorruptRunError` naming it and the fix.
    """
    path = Path(path)
    tensors, metadata = _read_safetensors(path, _CHECKPOINT_FIX)
    fmt = metadata.get(_KEY_FORMAT)
    if fmt is None or _KEY_SKELETON not in metadata:
        raise CorruptRunError(
            path,
            "a safetensors file but not a creditaudit checkpoint "
            "(no creditaudit.skeleton in its header)",
            fix=_CHECKPOINT_FIX,
        )
    if fmt != CHECKPOINT_FORMAT:
        raise CorruptRunError(
            path,
            f"checkpoint format {fmt!r}, this version reads {CHECKPOINT_FORMAT!r}",
            fix=_CHECKPOINT_FIX,
        )
    try:
        skeleton = json.loads(metadata[_KEY_SKELETON])
        meta = json.loads(metadata.get(_KEY_META, "{}"))
        state = unpack_state(tensors, skeleton, device)
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptRunError(
            path, f"inconsistent checkpoint header ({type(e).__name__}: {e})", fix=_CHECKPOINT_FIX
        ) from e
    if not isinstance(state, dict) or not isinstance(meta, dict):
        raise CorruptRunError(
            path, "checkpoint header does not describe a dict", fix=_CHECKPOINT_FIX
        )
    return state, meta


def save_tensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Atomically write a flat ``name -> tensor`` map (exported weights) as plain safetensors.

    Tensors are copied to contiguous CPU storage first, so tied or non-contiguous tensors are fine.
    ``metadata`` is the safetensors header's ``str -> str`` map, stored as given.
    """
    flat = {}
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TypeError(
                f"save_tensors takes str -> Tensor, got {type(name).__name__} -> {type(t).__name__}"
            )
        flat[name] = _cpu_copy(t)
    meta = dict(metadata) if metadata is not None else None
    if meta is not None and not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise TypeError("safetensors metadata must map str -> str")
    _atomic_save_file(Path(path), flat, meta)


def load_tensors(
    path: str | os.PathLike[str], device: str | torch.device | None = None
) -> dict[str, torch.Tensor]:
    """Read a flat safetensors file into ``name -> tensor`` (on ``device`` if given).

    Works for any safetensors file, including checkpoints (whose keys are the flat tensor keys).
    A missing or corrupt file raises :class:`CorruptRunError`.
    """
    tensors, _ = _read_safetensors(Path(path), "delete the file and export or download it again")
    if device is not None:
        dev = torch.device(device)
        tensors = {k: t.to(dev) for k, t in tensors.items()}
    return tensors
