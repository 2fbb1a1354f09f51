"""The engine's blocking Generation as an async stream: one thread per request iterates it and feeds an
asyncio.Queue, so the event loop never waits on llama.cpp. Cancelling frees the slot within one engine step."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import anyio
from starlette.responses import StreamingResponse

from ..errors import ContextOverflow, UserError
from ..runtime import EngineBusy, Message
from ..runtime.sampling import SamplingConfig
from .api_errors import ApiError

_END = object()


class Running:
    """One request's answer in progress; `answer` (runtime.answer.Answer) once the pieces are exhausted."""

    def __init__(self, gen, active: set):
        self.gen, self._active = gen, active
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self.finished = False
        active.add(self)
        threading.Thread(target=self._pump, name="llava-edge-request", daemon=True).start()

    def _pump(self) -> None:
        try:
            for piece in self.gen:
                self._put(piece)
            item = _END
        except UserError as e:  # e.g. the context filled up: the client's input, not a bug
            item = ApiError(400, str(e))
        except Exception as e:  # noqa: BLE001 - handed to the request, which answers 500
            item = e
        self._put(item)

    def _put(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop has closed (server shut down): nobody is listening
            self.gen.cancel()

    async def pieces(self) -> AsyncIterator[str]:
        try:
            while True:
                item = await self._queue.get()
                if item is _END:
                    self.finished = True
                    return
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                yield item
        finally:
            self.close()

    async def text(self, receive=None) -> str:
        """The whole answer; with `receive` (the ASGI channel) a client that hangs up cancels it."""
        watcher = asyncio.create_task(self._cancel_on_disconnect(receive)) if receive is not None else None
        try:
            return "".join([piece async for piece in self.pieces()])
        finally:
            if watcher is not None:
                watcher.cancel()

    async def _cancel_on_disconnect(self, receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.close()
                return

    def close(self) -> None:
        """Cancel the generation unless it already ended (idempotent, thread-safe)."""
        if not self.finished:
            self.gen.cancel()
        self._active.discard(self)

    @property
    def answer(self):
        return self.gen.answer


async def queue(engine, messages: list[Message], sampling: SamplingConfig, image_tokens=None):
    """Render, encode the images and queue the request (in a worker thread: image encodes take a while).
    A prompt longer than the context raises ContextOverflow (the caller decides: refuse or truncate)."""
    try:
        return await anyio.to_thread.run_sync(engine.generate, messages, sampling, image_tokens)
    except EngineBusy:
        raise ApiError(503, "the server is busy: every slot is taken and the queue is full; retry later",
                       code="server_busy", headers={"Retry-After": "1"}) from None
    except ContextOverflow:
        raise
    except UserError as e:
        raise ApiError(400, str(e)) from None


def overflow_error(e: ContextOverflow) -> ApiError:
    return ApiError(400, f"{e}: send fewer or shorter messages, or start the server with a larger --n-ctx",
                    param="messages", code="context_length_exceeded")  # OpenAI's code


async def start(engine, messages: list[Message], sampling: SamplingConfig, active: set,
                image_tokens=None) -> Running:
    """image_tokens: the request's own budget (None: the server's --image-tokens); checked by the engine (400)."""
    try:
        return Running(await queue(engine, messages, sampling, image_tokens), active)
    except ContextOverflow as e:
        raise overflow_error(e) from None


class StreamedAnswer(StreamingResponse):
    """A streaming response that cancels its generation however it ends (finished, client gone, shutdown)."""

    def __init__(self, content, running: Running, media_type: str):
        super().__init__(content, media_type=media_type, headers={"Cache-Control": "no-cache"})
        self.running = running

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.running.close()


def finish_reason(answer) -> str:
    """OpenAI's and Ollama's names: an answer cut by a shutdown ends as "length" (it is incomplete)."""
    return "stop" if answer.finish_reason == "stop" else "length"
