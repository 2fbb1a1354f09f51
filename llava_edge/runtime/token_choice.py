"""One request's choice of its next tokens from the model's logits: penalties, the format's mask, the draw, the
tokens the format forces after it, and the log-probabilities asked for. No torch.

The log-probabilities are the model's own (a log-softmax of the raw logits), taken before any penalty or mask,
as OpenAI and Ollama report them.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .constraint import Constraint, FormatError
from .sampling import SamplingConfig, apply_repeat_penalty, sample_token

MAX_FORCED = 32  # forced tokens that ride in one decode with the token before them


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # the likeliest tokens, best first


@dataclass
class Choice:
    tokens: list[int]  # the drawn token, then the tokens the format forces after it
    end: bool = False  # the format is complete: nothing but the end may follow


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


class TokenChooser:
    def __init__(self, sampling: SamplingConfig, constraint: Constraint | None, prompt_tokens: list[int]):
        self.sampling, self.constraint = sampling, constraint
        self.rng = np.random.default_rng(sampling.seed)
        n = sampling.repeat_last_n if sampling.repeat_penalty != 1.0 else 0
        self.recent: deque[int] = deque(prompt_tokens, maxlen=None if n == -1 else n)  # -1: the whole context
        self.logprobs: list[TokenLogprob] = []

    def choose(self, logits: np.ndarray, eos_id: int, room: int) -> Choice:
        """The next tokens from one logits row; room: how many tokens may still follow the drawn one."""
        s = self.sampling
        if s.logprobs or s.top_logprobs:
            lp = log_softmax(logits)
        scores = apply_repeat_penalty(logits, list(self.recent), s.repeat_penalty)
        if self.constraint is not None:
            scores = self.constraint.mask(scores)
            if not np.isfinite(scores).any():
                raise FormatError("the answer's format admits no token here")
        token = sample_token(scores, s.temperature, s.top_p, self.rng, s.top_k, s.min_p)
        if (s.logprobs or s.top_logprobs) and (token != eos_id or s.ignore_eos):  # EOS is no answer token
            self.logprobs.append(_entry(lp, token, s.top_logprobs))
        self.recent.append(token)
        if self.constraint is None or token == eos_id:
            return Choice([token])
        self.constraint.accept(token)
        forced = []
        # with logprobs asked for, each token needs its own logits row: no forced tokens then
        if s.forced_together and not (s.logprobs or s.top_logprobs):
            forced = self.constraint.forced(min(room, MAX_FORCED))
            self.recent.extend(forced)
        return Choice([token, *forced], end=self.constraint.finished)


def _entry(lp: np.ndarray, token: int, n_top: int) -> TokenLogprob:
    top = []
    if n_top:
        best = np.argpartition(-lp, n_top - 1)[:n_top]
        best = best[np.argsort(-lp[best], kind="stable")]
        top = [(int(t), float(lp[t])) for t in best]
    return TokenLogprob(token, float(lp[token]), top)
