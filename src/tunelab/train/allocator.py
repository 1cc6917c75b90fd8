"""Host allocator settings for training on CPU, and the peak-memory figure of a run.

Each step allocates and frees the same few GiB of activations. With glibc's defaults, freed
memory at the top of the heap is handed back to the kernel and the next step faults it in again,
page by page, each page zeroed: on a 2-core machine that was a quarter of the step time. Keeping
freed memory in the process (no trimming, a fixed mmap threshold) makes later steps reuse it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys
from pathlib import Path

import torch

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks above it are still mapped (and unmapped) one by one
NEVER_TRIM = 2**31 - 1


def keep_freed_memory() -> bool:
    """Apply the settings above where the C library is glibc; True if applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, NEVER_TRIM))


def reset_peak_memory() -> None:
    """Start a run's peak-memory count afresh, so that runs in one process (a sweep) each report
    their own peak: CUDA's allocator statistics, and on Linux the process's peak RSS (VmHWM)."""
    if torch.cuda.is_available():
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
