"""What a generation gives back: text cut at stop strings as it streams, the answer, its timings. No torch."""

from __future__ import annotations

import codecs
from dataclasses import asdict, dataclass, field


@dataclass
class Timings:
    vision_ms: float = 0.0  # preprocessing + ONNX encode of this turn's images; 0 when cached or already in KV
    prefill_ms: float = 0.0  # evaluating the new part of the prompt (image embeddings + text)
    ttft_ms: float = 0.0  # from the request to the first answer token, image encode included
    decode_tokens_per_s: float = 0.0  # answer tokens after the first, per second
    n_prompt_tokens: int = 0  # positions of the whole prompt, image included
    n_prefilled: int = 0  # of which evaluated for this answer
    n_cached: int = 0  # of which taken from the KV cache (n_prompt_tokens - n_prefilled)
    n_generated: int = 0
    image_cached: bool = False
    kv_restored: bool = False  # the image prefix came from the on-disk KV cache
    image_tokens: int = 0  # positions each image took (all of the tower's, or the --image-tokens budget)


@dataclass
class Answer:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max tokens or context), "interrupted", "cancelled"
    timings: Timings = field(default_factory=Timings)

    def to_dict(self) -> dict:
        return {"answer": self.text, "finish_reason": self.finish_reason, "n_prompt_tokens": self.timings.n_prompt_tokens,
                "n_generated_tokens": self.timings.n_generated, "timings": asdict(self.timings)}


class AnswerText:
    """Token bytes in, streamable text out: UTF-8 pieces joined across tokens, the leading space dropped
    (as the reference's .strip()), cut at the first stop string, and the tail that could still become a
    stop string held back until it cannot."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._raw = ""
        self._emitted = 0
        self.text = ""
        self.stopped = False

    def add(self, piece: bytes) -> str:
        """Append one token's bytes; returns the new text that is safe to show now."""
        self._raw += self._utf8.decode(piece)
        self._cut()
        if self.stopped:
            return self._take(len(self.text))
        return self._take(len(self.text) - held_back(self.text, self.stops))

    def finish(self) -> str:
        """The rest of the text (the held-back tail, an unfinished UTF-8 character as U+FFFD)."""
        if not self.stopped:
            self._raw += self._utf8.decode(b"", final=True)
            self._cut()
        return self._take(len(self.text))

    def _cut(self) -> None:
        text = self._raw.lstrip()
        cut = first_stop(text, self.stops)
        self.text, self.stopped = (text, False) if cut is None else (text[:cut], True)

    def _take(self, upto: int) -> str:
        if upto <= self._emitted:
            return ""
        piece, self._emitted = self.text[self._emitted : upto], upto
        return piece


def first_stop(text: str, stops: list[str]) -> int | None:
    found = [text.find(s) for s in stops if s in text]
    return min(found) if found else None


def held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of text that could be the start of a stop string (not streamed out yet)."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                longest = max(longest, k)
                break
    return longest
