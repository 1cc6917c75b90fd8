"""Which dtype frozen weights compute in: measured on the machine, not assumed.

On CPUs with AMX a bf16 matmul runs several times faster than fp32; without it, several times
slower. `auto` times both once per process and takes bf16 only where it wins clearly.
"""

from __future__ import annotations

import functools
import time

import torch


def resolve_frozen_dtype(setting: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    if setting != "auto":
        return getattr(torch, setting)
    if device.type == "cpu" and model_dtype == torch.float32 and bf16_matmul_speedup() >= 2.0:
        return torch.bfloat16
    return model_dtype


@functools.cache
def bf16_matmul_speedup() -> float:
    """fp32 time / bf16 time of a transformer-sized matmul on this CPU (about 0.1 s to measure)."""
    seconds = {}
    # Its own generator: measuring on the first call only must not move the global RNG, or runs in
    # one process would start from different random states.
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(512, 576, dtype=dtype, generator=generator)
        b = torch.randn(576, 1536, dtype=dtype, generator=generator)
        a @ b  # warm-up: kernel choice, thread pool
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - started)
        seconds[dtype] = best
    return seconds[torch.float32] / seconds[torch.bfloat16]
