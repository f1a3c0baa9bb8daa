"""Process-level tuning for long CPU jobs (no effect at import; call it explicitly)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from pathlib import Path

from .options import DEVICES  # also where callers look for it

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory instead of returning it to the OS after each batch.

    PyTorch on CPU allocates every activation afresh; by default glibc serves large blocks with
    mmap and gives them back on free, so each training step page-faults and zero-fills its
    memory again (about 15% system time here). Keeping it made the pbc training step about 10%
    faster on the development machine (docs/benchmarks.md). Returns False where it does not
    apply (not Linux with glibc); results are unchanged either way.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    settings = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 1 << 30), (_M_TOP_PAD, 256 << 20))
    return all(mallopt(option, value) == 1 for option, value in settings)


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS reports one, else all of them)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cpu_info() -> tuple[str, set[str]]:
    """The CPU's model name and its instruction-set flags, from /proc/cpuinfo ("", empty set where
    there is none). Code must not assume the flags of the machine it was written on: CPUs differ."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "", set()
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())  # the first processor's
    return fields.get("model name", ""), set(fields.get("flags", "").split())




def resolve_device(preference: str = "auto"):
    """The torch device for ``auto`` (CUDA when available), ``cpu`` or ``cuda``; a clear error when
    CUDA is asked for and absent (rather than a traceback deep inside PyTorch)."""
    import torch

    from .errors import LeukoscopeError

    if preference not in DEVICES:
        raise LeukoscopeError(f"unknown device {preference!r}; choose from {', '.join(DEVICES)}")
    if preference == "cuda" and not torch.cuda.is_available():
        raise LeukoscopeError("--device cuda: no CUDA device is available to PyTorch here; use --device cpu (or auto)")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun: this process's GPU of the node, shared round-robin
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cuda")
