"""Ollama's answer to a conversation longer than the context (its server's chatPrompt): drop the oldest messages,
one at a time, until the rest fits, always keeping the system messages and the last message. The images of a
dropped message go with it. Ollama logs this at debug level only; here the request's log line says
`truncated=N`. A conversation that does not fit even then is refused (400), as is one sent with
`"truncate": false`.
"""

from __future__ import annotations

from ..runtime.generation import Message
from . import generation
from .errors import ApiError


def without_oldest(messages: list[Message], n: int) -> list[Message]:
    """The conversation less its `n` oldest messages; the system messages among them stay, in front."""
    return [m for m in messages[:n] if m.role == "system"] + messages[n:]


async def start_fitting(engine, messages: list[Message], sampling, active: set) -> tuple[generation.Running, int]:
    """Queue the longest tail of the conversation that fits; returns it running and how many messages were
    dropped. Each try re-renders the prompt; the images' embeddings come from the engine's cache."""
    overflow = None
    for n in range(len(messages)):
        if n > 0 and messages[n - 1].role == "system":
            continue  # that message stays: the same prompt as the try before
        try:
            running = await generation.start(engine, without_oldest(messages, n), sampling, active)
        except ApiError as e:
            if e.code != generation.CONTEXT_LENGTH_EXCEEDED:
                raise
            overflow = e
            continue
        return running, sum(m.role != "system" for m in messages[:n])
    raise overflow  # even the system messages and the last message alone do not fit
