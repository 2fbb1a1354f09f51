"""One request to the engine: the chat it answers (messages with images), and its answer as it is made.

A Generation is iterated for text pieces by whoever asked (a server thread, the chat loop); the engine's
stepping thread feeds it. Without a stepping thread, iterating steps the engine in the caller's thread.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Union

import numpy as np

from .answer import Answer, AnswerText, Timings
from .sampling import SamplingConfig

Key = Union[int, tuple]  # a position: a token id, or ("image", sha256, index) for an image slot


@dataclass
class Message:
    role: str  # "system" | "user" | "assistant"
    text: str
    images: list = field(default_factory=list)  # user messages: paths, bytes or EncodedImage, in part order



class Generation:
    """One request's answer as it is made: iterate for text pieces; `answer` once it has finished."""

    def __init__(self, engine, keys: list[Key], images: dict[int, np.ndarray], sampling: SamplingConfig,
                 stops: list[str], timings: Timings, t_start: float):
        self.engine, self.keys, self.images, self.sampling = engine, keys, images, sampling
        self.timings, self.t_start = timings, t_start
        self.text = AnswerText(stops)
        self.rng = np.random.default_rng(sampling.seed)
        self.answer: Answer | None = None
        self.error: str | None = None
        self.slot = None  # the engine's slot while it is being answered
        self.cursor = 0  # next prompt position to evaluate
        self.pending: int | None = None  # sampled token, fed to the KV by the next step
        self.t_prefill = self.t_first = 0.0
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()
        self._cancel: str | None = None

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop this answer (thread-safe); its slot is free again after at most one step."""
        if not self._done.is_set():
            self._cancel = reason
            self.engine._wake()

    def wait(self, timeout: float | None = None) -> Answer | None:
        self._done.wait(timeout)
        return self.answer

    def __iter__(self):
        try:
            while True:
                try:
                    item = self._events.get_nowait()
                except queue.Empty:
                    if self.engine.running:
                        item = self._events.get()
                    else:
                        self.engine.step()
                        continue
                if item is None:
                    break
                yield item
        except BaseException as e:  # Ctrl-C, or the consumer stopped reading (GeneratorExit)
            self.cancel("interrupted" if isinstance(e, KeyboardInterrupt) else "cancelled")
            if not self.engine.running:
                self.engine.step()  # frees the slot and finishes the answer now
            raise
        if self.error is not None:
            raise RuntimeError(self.error)

    def emit(self, piece: str) -> None:
        if piece:
            self._events.put(piece)

    def finish(self, reason: str) -> None:
        self.emit(self.text.finish())
        now = time.perf_counter()
        t = self.timings
        if self.t_first and t.n_generated > 1:
            t.decode_tokens_per_s = (t.n_generated - 1) / max(now - self.t_first, 1e-9)
        self.answer = Answer(self.text.text.strip(), reason, t)
        self._events.put(None)
        self._done.set()
