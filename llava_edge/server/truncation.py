"""Ollama's answer to a conversation longer than the context, in its two steps:

1. (its server's chatPrompt) drop the oldest messages, one at a time, until the rest fits, always keeping the
   system messages and the last message; the images of a dropped message go with it. Ollama logs this at
   debug level only.
2. (its runner) when even that is too long, cut the prompt: Ollama keeps its first `num_keep` tokens and the
   end, and logs a warning. Here the start of the last message's text is cut instead, so the template and the
   system prompt stay whole, and room is left for an answer (a quarter of the context, or `num_predict` if
   smaller: Ollama shifts its context while it answers, this engine stops when it is full).

The request's log line says both (`truncated=N` messages, `prompt_cut=P` positions before the cut). With
`"truncate": false`, or when the images alone do not fit, the request is refused (400).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import anyio

from ..errors import UserError
from ..runtime import Message
from . import answers
from .api_errors import ApiError


@dataclass
class Fitted:
    running: answers.Running
    n_dropped: int = 0  # oldest messages dropped
    cut_from: int = 0  # positions of the prompt before its last message was cut (0: not cut)


@dataclass
class Fit:
    messages: list[Message]
    n_dropped: int = 0
    cut_from: int = 0


def without_oldest(messages: list[Message], n: int) -> list[Message]:
    """The conversation less its `n` oldest messages; the system messages among them stay, in front."""
    return [m for m in messages[:n] if m.role == "system"] + messages[n:]


def fit(engine, messages: list[Message], max_tokens: int, image_tokens=None) -> Fit:
    """Where to cut, counted with the engine's own renderer (no image is read or encoded): the fewest oldest
    messages dropped, then the shortest start of the last message's text."""
    def size(ms: list[Message]) -> int:
        return engine.count_positions(ms, image_tokens)

    n_ctx = engine.n_ctx_seq
    for n in range(len(messages)):
        if n > 0 and messages[n - 1].role == "system":
            continue  # that message stays: the same prompt as the try before
        kept = without_oldest(messages, n)
        if size(kept) < n_ctx:
            return Fit(kept, sum(m.role != "system" for m in messages[:n]))
    kept = without_oldest(messages, len(messages) - 1)
    n_dropped = sum(m.role != "system" for m in messages[:-1])
    last, text = kept[-1], kept[-1].text
    room = n_ctx - min(max_tokens, n_ctx // 4)  # what the prompt may take, leaving room for an answer

    def cut(k: int) -> list[Message]:
        return kept[:-1] + [replace(last, text=text[k:])]

    low, high = 1, max(1, len(text) - 1)  # cut at least one character, keep at least one
    if size(cut(high)) > room:  # the images and the template alone do not fit: the engine refuses it
        return Fit(cut(high), n_dropped)
    while low < high:  # the fewest characters cut that fit (fewer characters never take more positions)
        mid = (low + high) // 2
        if size(cut(mid)) <= room:
            high = mid
        else:
            low = mid + 1
    return Fit(cut(low), n_dropped, size(kept))


async def start_fitting(engine, messages: list[Message], sampling, active: set, image_tokens=None) -> Fitted:
    try:
        fitted = await anyio.to_thread.run_sync(fit, engine, messages, sampling.max_tokens, image_tokens)
    except UserError as e:
        raise ApiError(400, str(e)) from None
    running = await answers.start(engine, fitted.messages, sampling, active, image_tokens)
    return Fitted(running, fitted.n_dropped, fitted.cut_from)
