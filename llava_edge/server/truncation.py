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

import math
from dataclasses import dataclass, replace

from ..errors import ContextOverflow
from ..runtime.generation import Message
from . import generation

MAX_CUTS = 8  # tries at cutting the last message; each estimates its cut from the ones before


@dataclass
class Fitted:
    running: generation.Running
    n_dropped: int = 0  # oldest messages dropped
    cut_from: int = 0  # positions of the prompt before its last message was cut (0: not cut)


def without_oldest(messages: list[Message], n: int) -> list[Message]:
    """The conversation less its `n` oldest messages; the system messages among them stay, in front."""
    return [m for m in messages[:n] if m.role == "system"] + messages[n:]


async def start_fitting(engine, messages: list[Message], sampling, active: set, image_tokens=None) -> Fitted:
    overflow = None
    for n in range(len(messages)):
        if n > 0 and messages[n - 1].role == "system":
            continue  # that message stays: the same prompt as the try before
        try:
            gen = await generation.queue(engine, without_oldest(messages, n), sampling, image_tokens)
        except ContextOverflow as e:
            overflow = e
            continue
        return Fitted(generation.Running(gen, active), sum(m.role != "system" for m in messages[:n]))
    kept = without_oldest(messages, len(messages) - 1)
    gen = await cut_last_message(engine, kept, sampling, overflow, image_tokens)
    return Fitted(generation.Running(gen, active), sum(m.role != "system" for m in messages[:-1]),
                  overflow.n_positions)


async def cut_last_message(engine, messages: list[Message], sampling, overflow: ContextOverflow, image_tokens=None):
    """Queue `messages` with the start of the last one's text cut until the prompt fits with room to answer."""
    last = messages[-1]
    budget = overflow.n_ctx - min(sampling.max_tokens, overflow.n_ctx // 4)
    text = last.text
    # positions per character of text: first the whole prompt's less its images', then measured between the
    # last two tries (secant)
    n_image_positions = engine.bundle.vision.n_image_tokens * sum(len(m.images) for m in messages)
    slope = max(1, overflow.n_positions - n_image_positions) / max(1, sum(len(m.text) for m in messages))
    for _ in range(MAX_CUTS):
        before = (len(text), overflow.n_positions)
        # 10% more than the estimate: the template's positions, counted as text's, make it short
        text = text[max(1, math.ceil(1.1 * (overflow.n_positions - budget) / slope)):]
        if not text:
            break
        try:
            return await generation.queue(engine, messages[:-1] + [replace(last, text=text)], sampling, image_tokens)
        except ContextOverflow as e:
            overflow = e
        if before[1] > overflow.n_positions:
            slope = (before[1] - overflow.n_positions) / (before[0] - len(text))
    raise generation.overflow_error(overflow)  # the images and the template alone do not fit
