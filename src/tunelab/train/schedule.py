"""Learning rate at each step: linear warmup, then cosine, linear or constant."""

from __future__ import annotations

import math


def warmup_steps(warmup: float, total_steps: int) -> int:
    """`warmup` < 1 is a fraction of the run; >= 1 is a number of steps."""
    return int(math.ceil(warmup * total_steps)) if warmup < 1 else int(warmup)


def lr_at(step: int, total_steps: int, peak_lr: float, schedule: str, warmup: int) -> float:
    """The learning rate for 1-based `step`: rises to `peak_lr` over `warmup` steps, then decays towards 0."""
    if warmup and step <= warmup:
        return peak_lr * step / warmup
    if schedule == "constant":
        return peak_lr
    # 0 on the first step after warmup (at the peak), (n-1)/n on the last: every step trains. With
    # `step - warmup` the last step got lr 0 and max_steps=N made only N-1 updates.
    progress = (step - warmup - 1) / max(1, total_steps - warmup)
    if schedule == "linear":
        return peak_lr * max(0.0, 1.0 - progress)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
