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
from contextlib import contextmanager

import numpy as np

from ..errors import UserError
from .answer import Answer
from .engine import Engine
from .engine_config import DEFAULT_DEVICE, EngineConfig
from .kv_type import DEFAULT_KV_TYPE
from .model import Model
from .prompt import Message
from .sampling import SamplingConfig
from .vision import EncodedImage


class ChatSession:
    def __init__(self, model: Model, config: EngineConfig | None = None, owns_model: bool = False):
        """A chat on sequence 0 of a one-sequence engine over `model`; config's other settings are the engine's
        (its image_tokens: the image budget of this chat, None for every token)."""
        config = config or EngineConfig()
        if config.parallel != 1:
            raise UserError("a chat session decodes one sequence: its EngineConfig.parallel must be 1")
        self.engine = Engine(model, config, owns_model)
        self.bundle, self.vision = model.bundle, model.vision
        self.budget = self.engine.default_budget  # the image budget of this conversation (set_image)
        self.image: EncodedImage | bytes | None = None  # bytes: not encoded (see set_image)
        self.image_path = None  # what set_image was given, when it was a path
        self._image_fresh = False  # the image's encode time has not been reported by a turn yet
        self._paid_ahead = False  # the image was encoded and prefilled before the question was asked
        self._prefill = None  # the Generation prefilling the image prefix, while it runs
        self.turns: list[tuple[str, str]] = []
        self.last: Answer | None = None
        self.last_generation = None

    @classmethod
    def open(
        cls,
        bundle_dir: str | os.PathLike | None = None,
        device: str = DEFAULT_DEVICE,
        threads: int | None = None,
        n_ctx: int | None = None,
        kv_type: str = DEFAULT_KV_TYPE,
        cache_dir: str | os.PathLike | None = None,
        verify: bool = True,
        kv_cache_dir: str | os.PathLike | None = None,
        image_tokens: int | None = None,
    ) -> ChatSession:
        """Model.open and a chat over it that owns it (for scripts: the CLI opens the Model itself)."""
        model = Model.open(bundle_dir, device=device, threads=threads, verify=verify, image_cache_dir=cache_dir)
        config = EngineConfig(parallel=1, n_ctx=n_ctx, kv_type=kv_type, image_tokens=image_tokens,
                              kv_cache_dir=str(kv_cache_dir) if kv_cache_dir else None)
        try:
            return cls(model, config, owns_model=True)
        except BaseException:
            model.close()
            raise

    # ------------------------------------------------------------------ conversation state

    def set_image(self, source: str | os.PathLike | bytes, image_tokens: int | None = None) -> EncodedImage | bytes:
        """Start a new conversation about this image, at image_tokens tokens (None: the engine's budget): encoded
        now (or taken from the embedding cache), unless the disk KV store holds the conversation's prefix up to
        the image's end; then it is never encoded, and the conversation holds the image's bytes."""
        budget = self.engine.budget(image_tokens)
        _, data, _ = self.vision.identify(source)
        if self.engine.prefix_stored([Message("user", "", [data])], budget):
            image = data
        else:
            image = self.vision.encode(source, budget)
        self.cancel_prefill()
        self.budget = budget
        self.image, self._image_fresh, self._paid_ahead = image, True, False
        self.image_path = None if isinstance(source, bytes) else source
        self.turns = []
        return self.image

    def prefill(self):
        """Start evaluating the conversation's image prefix (system prompt + image) now, before the question is
        known; whoever steps the engine (its thread, or the next ask) carries it on. The answers do not change.
        Returns the prefill's Generation (None when there is nothing to prefill)."""
        if self.image is not None and not self.turns and self._prefill is None:
            self._prefill = self.engine.prefill(self.messages(""), self.budget)
            self._paid_ahead = True
        return self._prefill

    @contextmanager
    def while_typing(self):
        """While the user types: the engine's thread prefills the image prefix (see prefill). It stops after its
        current step (about a second) when the block ends, by a line, Ctrl-C or Ctrl-D; what is left of the
        prefill runs before the next question, in the asking thread."""
        prefill = self.prefill()
        if prefill is None or prefill.finished:  # nothing to do: no second thread while the line is read
            yield
            return
        self.engine.start()
        try:
            yield
        finally:
            self.engine.stop()

    def cancel_prefill(self) -> None:
        if self._prefill is not None:
            self._prefill.cancel()
            self._prefill = None

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
        generation = self.engine.generate(self.messages(question), sampling or SamplingConfig(), self.budget)
        self._prefill = None  # queued behind it: the question resumes from what the prefill leaves in the KV
        fresh = self.image is not None and self._image_fresh
        encoded = isinstance(self.image, EncodedImage)  # else its KV is on disk: it costs no encode
        vision_ms = self.image.vision_ms if fresh and encoded else 0.0
        image_cached = (not encoded or self.image.cached) if fresh else False
        waited_ms = 0.0 if self._paid_ahead else vision_ms  # an encode done while the user typed is not waited for
        self._image_fresh = self._paid_ahead = False
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
                t.ttft_ms = waited_ms + 1000 * (generation.t_first - t_start)
            self.turns.append((question, answer.text))
            self.last, self.last_generation = answer, generation

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
        logits = self.last_generation.last_logits if self.last_generation is not None else None
        if logits is None:
            raise RuntimeError("no token drawn yet")
        return logits

    def tokenize(self, text: str) -> list[int]:
        return self.engine.tokenizer.tokenize(text)

    def close(self) -> None:
        self.engine.close()
