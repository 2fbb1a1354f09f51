"""The learning-rate schedule every trainer here uses (the LLaVA recipe and the demo's CLIP tower)."""

from __future__ import annotations

import math


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Multiplier of the base lr: linear warmup, then cosine to zero (HF's cosine schedule)."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
