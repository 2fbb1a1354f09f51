"""A chat about an image: one sequence of the decoder engine, the reference's prompt, streamed answers.

Every turn the whole conversation is rendered exactly as the reference would (template, "<image>\\n" before
the first question, BOS, "</s>" after each answer) and handed to the engine, which evaluates only the part
after what the sequence's KV cache already holds. So a second question about the same image costs its own
few tokens, never a new image encode or a new prefill of the image. No torch.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import numpy as np

from ..errors import UserError
from .answer import Answer
from .engine import Engine, EngineConfig
from .generation import Message
from .sampling import SamplingConfig
from .vision import EncodedImage


class ChatSession:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.bundle, self.vision = engine.bundle, engine.vision
        self.image: EncodedImage | None = None
        self._image_fresh = False  # the image's encode time has not been reported by a turn yet
        self.turns: list[tuple[str, str]] = []
        self.last: Answer | None = None

    @classmethod
    def open(
        cls,
        bundle_dir: str | os.PathLike | None = None,
        device: str = "auto",
        threads: int | None = None,
        n_ctx: int | None = None,
        f32_kv: bool = False,
        cache_dir: str | os.PathLike | None = None,
        verify: bool = True,
        kv_cache_dir: str | os.PathLike | None = None,
    ) -> ChatSession:
        """Load a bundle (default: the demo bundle in the package) for chatting."""
        config = EngineConfig(parallel=1, n_ctx=n_ctx, threads=threads, device=device, f32_kv=f32_kv,
                              image_cache_dir=str(cache_dir) if cache_dir else None,
                              kv_cache_dir=str(kv_cache_dir) if kv_cache_dir else None)
        return cls(Engine.open(bundle_dir, config, verify=verify))

    # ------------------------------------------------------------------ conversation state

    def set_image(self, source: str | os.PathLike | bytes) -> EncodedImage:
        """Start a new conversation about this image (encoded now, or taken from the cache)."""
        self.image, self._image_fresh = self.vision.encode(source), True
        self.turns = []
        return self.image

    def reset(self) -> None:
        """Forget the questions and answers; keep the image (its KV is reused by the next question)."""
        self.turns = []

    def messages(self, question: str) -> list[Message]:
        images = [self.image] if self.image is not None else []
        out = []
        for i, (q, a) in enumerate(self.turns):
            out += [Message("user", q, images if i == 0 else []), Message("assistant", a)]
        return out + [Message("user", question, images if not self.turns else [])]

    # ------------------------------------------------------------------ answering

    def ask(self, question: str, sampling: SamplingConfig | None = None) -> Iterator[str]:
        """Stream the answer to a question as text pieces; `self.last` holds the whole Answer afterwards,
        also when the caller stops early (Ctrl-C): the partial answer is then part of the conversation."""
        question = question.strip()
        if not question:
            raise UserError("the question is empty")
        t_start = time.perf_counter()
        generation = self.engine.generate(self.messages(question), sampling or SamplingConfig())
        vision_ms = self.image.vision_ms if self.image is not None and self._image_fresh else 0.0
        image_cached = self.image.cached if self.image is not None and self._image_fresh else False
        self._image_fresh = False
        try:
            yield from generation
        finally:
            answer = generation.answer
            if answer is None:  # closed before the engine finished it
                generation.cancel()
                answer = generation.wait()
            t = answer.timings
            t.vision_ms, t.image_cached = vision_ms, image_cached
            if generation.t_first:  # time to first token counts this turn's image encode, as a user waits for it
                t.ttft_ms = vision_ms + 1000 * (generation.t_first - t_start)
            self.turns.append((question, answer.text))
            self.last = answer

    def answer(self, question: str, sampling: SamplingConfig | None = None) -> Answer:
        for _ in self.ask(question, sampling):
            pass
        assert self.last is not None
        return self.last

    # what the sequence holds (tests, benchmarks)
    @property
    def n_past(self) -> int:
        return len(self.engine.slots[0].held)

    def last_logits(self) -> np.ndarray:
        """The logits the last answer token was drawn from ([n_vocab] float32)."""
        logits = self.engine.slots[0].last_logits
        if logits is None:
            raise RuntimeError("no token drawn yet")
        return logits

    def tokenize(self, text: str) -> list[int]:
        return self.engine.decoder.tokenize(text)

    def close(self) -> None:
        self.engine.close()
