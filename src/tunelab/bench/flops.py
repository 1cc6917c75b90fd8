"""Machine peak and useful work: the two numbers behind 'what fraction of the CPU does training use'."""

from __future__ import annotations

import time

import torch
from torch import nn


def matmul_peak_gflops(device: torch.device | None = None, size: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """Best matmul rate of this machine in `dtype`, with torch's own thread settings: the ceiling to compare with."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        size, repeats = 8192, 50
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(3):
        a @ b  # warm-up: thread pool, kernel choice
        _sync(device)
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        _sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 * repeats / best / 1e9


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def training_flops(model: nn.Module, samples: list[tuple[int, int]], backward: bool = True) -> float:
    """Useful FLOPs of one pass of fine-tuning over `samples` ((tokens, target tokens) pairs).

    Per token: 6·N for trained weights (forward, input and weight gradients), 4·N for frozen
    ones (forward and input gradient); the output head only at target positions, since the
    loss needs nothing else; causal attention forward 2·n²·d and backward twice that, per layer.
    Padding is never useful. `model` carries the method (meta-device tensors are fine).
    `backward=False`: the forward alone (a reference policy's), 2·N per token and 2·n²·d.
    """
    head = model.get_output_embeddings()
    per_token = per_target = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            cost = ((6 if module.weight.requires_grad else 4) if backward else 2) * module.weight.numel()
            if module is head:
                per_target += cost
            else:
                per_token += cost
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    query_width = config.num_attention_heads * head_dim
    attention = (6 if backward else 2) * config.num_hidden_layers * query_width
    return float(sum(n * per_token + t * per_target + attention * n * n for n, t in samples))
