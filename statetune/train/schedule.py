"""Learning-rate schedule: linear warmup, then cosine decay from the peak to a final rate."""

from __future__ import annotations

import math


def lr_at(step: int, total: int, peak: float, final: float, warmup: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * progress))
