"""Host allocator settings for training on CPU, and the peak-memory figure of a run.

Each step allocates and frees the same few GiB of activations. With glibc's defaults, freed
memory at the top of the heap is handed back to the kernel and the next step faults it in again,
page by page, each page zeroed: on a 2-core machine that was a quarter of the step time. Keeping
freed memory in the process (no trimming, a fixed mmap threshold) makes later steps reuse it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import sys
from pathlib import Path

import torch

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks above it are still mapped (and unmapped) one by one
NEVER_TRIM = 2**31 - 1


def _glibc_function(name: str):
    """glibc's `name` (mallopt, malloc_trim), or None under another C library (musl and others)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> bool:
    """Apply the settings above where the C library is glibc; True if applied."""
    mallopt = _glibc_function("mallopt")
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))


def reset_peak_memory() -> None:
    """Start a run's peak-memory count afresh, so that runs in one process (a sweep) each report
    their own peak: CUDA's allocator statistics, and on Linux the process's peak RSS (VmHWM).
    What an earlier run freed is handed back to the kernel first: kept in the process (the settings
    above never trim), it would count in this run's peak."""
    gc.collect()
    malloc_trim = _glibc_function("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set size
    except OSError:
        pass


def peak_memory_mb() -> float:
    """MiB at the peak since `reset_peak_memory`: CUDA allocations on a GPU, else resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux and BSD report KiB
