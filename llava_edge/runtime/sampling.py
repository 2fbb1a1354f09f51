"""How the next token is chosen: the sampling settings of one request, and the draw itself. No torch."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from .constraint import check_format

MAX_TOP_LOGPROBS = 20


@dataclass
class SamplingConfig:
    max_tokens: int = 256
    temperature: float = 0.0  # 0: greedy, deterministic
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # keep going past EOS (benchmarks time a fixed number of tokens)
    stop: tuple[str, ...] = ()  # extra strings that end the answer (the template's own stops always apply)
    format: str | dict | None = None  # "json" (any JSON object) or a JSON schema: the answer is held to it
    forced_together: bool = True  # tokens the format forces enter the KV in one decode with the token before them
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off; else tokens below min_p times the likeliest one's probability are dropped
    repeat_penalty: float = 1.0  # 1: off; llama.cpp's: a seen token's positive logit / p, negative * p
    repeat_last_n: int = 64  # the tokens repeat_penalty looks back over (prompt and answer)
    logprobs: bool = False  # report each answer token's log-probability (the model's, before any mask)
    top_logprobs: int = 0  # and the likeliest alternatives, 0 to 20

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
        if not _is_integer(self.top_k) or self.top_k < 0:
            raise UserError(f"top-k must be an integer >= 0 (got {self.top_k!r})")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise UserError(f"min-p must be in [0, 1] (got {self.min_p!r})")
        if not _is_number(self.repeat_penalty) or not 0 < self.repeat_penalty <= 10:
            raise UserError(f"repeat penalty must be in (0, 10] (got {self.repeat_penalty!r})")
        if not _is_integer(self.repeat_last_n) or self.repeat_last_n < -1:
            raise UserError(f"repeat-last-n must be an integer >= -1 (got {self.repeat_last_n!r})")
        if not _is_integer(self.top_logprobs) or not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise UserError(f"top_logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS} (got {self.top_logprobs!r})")
        check_format(self.format)


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_integer(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def sample_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator, top_k: int = 0,
                 min_p: float = 0.0) -> int:
    """Greedy at temperature 0 (top-k, top-p and min-p keep the likeliest token, so they change nothing), else
    a draw after top-k, top-p and min-p."""
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p >= 1.0 and top_k <= 0 and min_p <= 0:
        return int(rng.choice(len(p), p=p))
    order = np.argsort(-p, kind="stable")
    if top_k > 0:
        order = order[:top_k]
    if top_p < 1.0:
        order = order[: int(np.searchsorted(np.cumsum(p[order]) / p[order].sum(), top_p)) + 1]
    if min_p > 0:
        order = order[p[order] >= min_p * p[order[0]]]
    return int(rng.choice(order, p=p[order] / p[order].sum()))


def apply_repeat_penalty(logits: np.ndarray, recent: list[int], penalty: float) -> np.ndarray:
    """llama.cpp's repetition penalty over the recent tokens (each once): a positive logit divided by the
    penalty, a negative one multiplied (a copy)."""
    if penalty == 1.0 or not recent:
        return logits
    out = logits.copy()
    seen = np.unique(np.asarray(recent, dtype=np.int64))
    seen = seen[(seen >= 0) & (seen < len(out))]
    row = out[seen]
    out[seen] = np.where(row > 0, row / penalty, row * penalty)
    return out
