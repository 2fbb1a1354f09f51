"""One request to the engine, and its answer as it is made.

A Generation is iterated for text pieces by whoever asked (a server thread, the chat loop); the engine's
stepping thread feeds it through its public methods. Without a stepping thread, iterating steps the engine in the
caller's thread, so Ctrl-C lands there. Where the request stands in the prompt is the scheduler's (its Job).
"""

from __future__ import annotations

import queue
import threading
import time

import numpy as np

from ..errors import UserError
from .answer import Answer, AnswerText, Timings
from .constraint import FormatError
from .sampling import SamplingConfig
from .token_choice import TokenChooser


class Generation:
    """One request's answer as it is made: iterate for text pieces; `answer` once it has finished."""

    def __init__(self, engine, images: dict[int, np.ndarray], sampling: SamplingConfig, stops: list[str],
                 timings: Timings, t_start: float, constraint=None, prompt_tokens: list[int] = ()):
        self.engine, self.sampling, self.timings, self.t_start = engine, sampling, timings, t_start
        self.images = images  # first prompt position of each image -> its embeddings
        self.job = None  # the scheduler's view of this request, set by the engine when it is queued
        self.text = AnswerText(stops)
        self.chooser = TokenChooser(sampling, constraint, list(prompt_tokens))  # the format, penalties, logprobs
        self.answer: Answer | None = None
        self.error: str | None = None
        self.error_is_users = False  # the error is the request's own (its format), not the engine's
        self.last_logits: np.ndarray | None = None
        self.t_prefill = self.t_first = 0.0
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Event()

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop this answer (thread-safe); its slot is free again after at most one step."""
        if not self._done.is_set():
            self.engine.cancel(self, reason)

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
            raise (UserError if self.error_is_users else RuntimeError)(self.error)

    # ------------------------------------------------------------------ fed by the stepping thread

    def started(self, n_cached: int, n_prefilled: int, kv_restored: bool = False) -> None:
        """Admitted: n_cached prompt positions come from the KV, n_prefilled are evaluated now."""
        t = self.timings
        t.n_cached, t.n_prefilled, t.kv_restored = n_cached, n_prefilled, t.kv_restored or kv_restored
        self.t_prefill = time.perf_counter()

    @property
    def logprobs(self):
        """The answer tokens' log-probabilities so far (when the request asked for them)."""
        return self.chooser.logprobs

    def draw(self, logits: np.ndarray, eos_id: int, piece, room_left: int,
             batch_room: int = 1) -> tuple[list[int] | None, str | None]:
        """The next tokens from these logits: (tokens to evaluate next, None) or (None, finish reason). The
        tokens are the drawn one and those the format forces after it."""
        self.last_logits = logits
        now = time.perf_counter()
        t = self.timings
        if not self.t_first:
            self.t_first = now
            t.prefill_ms = 1000 * (now - self.t_prefill)
            t.ttft_ms = 1000 * (now - self.t_start)
        room = min(room_left, batch_room, self.sampling.max_tokens - t.n_generated) - 1
        try:
            choice = self.chooser.choose(logits, eos_id, room)
        except FormatError as e:  # this request's own format, stuck: its answer ends, the batch goes on
            self.error, self.error_is_users = str(e), True
            return None, "error"
        if choice.tokens[0] == eos_id and not self.sampling.ignore_eos:
            return None, "stop"
        for token in choice.tokens:
            t.n_generated += 1
            self.emit(self.text.add(piece(token)))
            if self.text.stopped:
                return None, "stop"
        if choice.end:
            return None, "stop"
        if t.n_generated >= self.sampling.max_tokens or room_left <= 0:
            return None, "length"
        return choice.tokens, None

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
