"""How the next token is chosen: the sampling settings of one request, and the draw itself. No torch."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from ..errors import UserError


@dataclass
class SamplingConfig:
    max_tokens: int = 256
    temperature: float = 0.0  # 0: greedy, deterministic
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # keep going past EOS (benchmarks time a fixed number of tokens)
    stop: tuple[str, ...] = ()  # extra strings that end the answer (the template's own stops always apply)

    def __post_init__(self):
        # Checked here, before any native call: a NaN temperature or a negative seed must be one line, not a crash.
        if not _is_integer(self.max_tokens) or self.max_tokens < 1:
            raise UserError(f"max tokens must be an integer >= 1 (got {self.max_tokens!r})")
        if not _is_number(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise UserError(f"temperature must be a finite number >= 0 (got {self.temperature!r})")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise UserError(f"top-p must be in (0, 1] (got {self.top_p!r})")
        if self.seed is not None and (not _is_integer(self.seed) or self.seed < 0):
            raise UserError(f"seed must be an integer >= 0 (got {self.seed!r})")


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_integer(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def sample_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1]
        return int(rng.choice(keep, p=p[keep] / p[keep].sum()))
    return int(rng.choice(len(p), p=p))
