"""Which dtype frozen weights compute in, decided by the CPU's instruction set (never by timing).

On CPUs with bf16 dot-product instructions (AMX tiles, or AVX512-BF16) a bf16 matmul runs several
times faster than fp32 (4.4x measured on this project's 2-core AVX512-BF16 machine); without them,
several times slower. A timing decision would differ between processes of one sweep under load
and break cross-process reproducibility; the instruction set is the same every time.
"""

from __future__ import annotations

import functools

import torch


def resolve_frozen_dtype(setting: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    if setting != "auto":
        return getattr(torch, setting)
    if device.type == "cpu" and model_dtype == torch.float32 and cpu_has_bf16_matmul():
        return torch.bfloat16
    return model_dtype


@functools.cache
def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU has the instructions that make bf16 matmuls fast (as torch detects them)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(check() for check in checks if check is not None)
