"""Keep freed memory in the process, so large CPU tensors do not page-fault on every allocation.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves a request above its mmap
threshold (at most 32 MiB) with a fresh ``mmap`` and gives it back to the kernel on ``free``, so
every large activation — a vit_mini evaluation batch of 1,000 images holds 50 MB tensors, the ρ
probe's stacked directions hundreds of MB — is zero-filled page by page again at each use. Measured
on one CPU thread (the cpu profile's vit_mini): an evaluation of the 10,000 test images 11.6 s →
8.1 s, the full probe 80 s → 58 s, a training step 7% faster; SmallCNN steps 8%. The price is a
higher resident set: the process keeps what it freed (vit_mini's full probe: peak 4.2 → 5.7 GiB).

:func:`keep_freed_memory` sets, for this process only, ``M_MMAP_MAX = 0`` (every allocation from
the heap) and ``M_TRIM_THRESHOLD`` = 1 GiB (free heap above that is returned to the system, so a
one-off peak such as the final probe does not stay resident). It changes nothing a run computes.
It applies on Linux with glibc, once per process; elsewhere it does nothing. Set the environment
variable ``CREDITAUDIT_MALLOC=system`` to leave the allocator as it is.

:func:`available_memory` says how much memory new work can take (sweeps size their worker count
and stacks their size by it); :func:`device_memory` how much a device has at all (a model that
cannot fit in it is refused before it is built).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 1 << 30

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the setting above to this process (idempotent). Returns whether it is in effect."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("CREDITAUDIT_MALLOC", "").lower() == "system" or not sys.platform.startswith(
        "linux"
    ):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
    return _applied


def device_memory(device) -> int | None:
    """Bytes of memory of a ``torch.device``: a CUDA card's total, or the machine's physical memory
    (within the cgroup's limit, in a container) for the CPU; None where unknown (MPS)."""
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_properties(device).total_memory
    if device.type != "cpu":
        return None
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:  # cgroup v2; "max" when unlimited
            limit = f.read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def available_memory() -> int | None:
    """Bytes of memory new processes can take without swapping: ``MemAvailable`` of /proc/meminfo
    (Linux), else the free physical pages (``os.sysconf``), else None (unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None
