"""OpenAI's chat API: POST /v1/chat/completions (text and image_url parts, SSE streaming, usage) and GET /v1/models."""

from __future__ import annotations

from typing import Any

import json
import time
import uuid
from dataclasses import asdict

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from ..runtime import Message
from . import generation
from .errors import ApiError, error_body
from .attached_files import strip_listing
from .media import load_image_url
from .parsing import parse_body, sampling_config
from .request_log import record_of

router = APIRouter()

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
DEFAULT_MAX_TOKENS = 1 << 20  # no limit of our own: the answer stops at EOS or when the context is full


class ImageUrl(BaseModel):
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    image_url: ImageUrl | str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # penalties, user, logit_bias, ...: accepted and not used
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1)
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False  # vLLM's and llama.cpp's extension: answers of exactly max_tokens (benchmarks)
    tools: list[dict] | None = None  # accepted and ignored: the model cannot call tools (docs/server-clients.md)
    tool_choice: str | dict | None = None
    image_tokens: Any = None  # llava-edge's extension: tokens per image (checked by the engine: 400 when bad)


def bans_eos_only(logit_bias: dict[str, float] | None, eos_id: int) -> bool:
    """logit_bias is supported for one use, {EOS: -100}: an answer that runs to max_tokens."""
    if not logit_bias:
        return False
    if set(logit_bias) != {str(eos_id)} or logit_bias[str(eos_id)] > -100:
        raise ApiError(400, f"logit_bias: only banning the end-of-sequence token ({{\"{eos_id}\": -100}}) is supported",
                       param="logit_bias", code="unsupported_logit_bias")
    return True


def check_tool_choice(req: ChatRequest) -> None:
    """A request that demands a tool call cannot be served by a model that makes none; "auto" and "none" can."""
    if req.tool_choice not in (None, "auto", "none"):
        raise ApiError(400, "tool_choice: this model cannot call tools (send \"auto\", \"none\" or no tool_choice)",
                       param="tool_choice", code="unsupported_tool_choice")


async def engine_messages(req: ChatRequest, request: Request) -> list[Message]:
    cfg = request.app.state.cfg
    messages, n_images = [], 0
    for i, m in enumerate(req.messages):
        role = ROLES.get(m.role)
        if role is None:
            raise ApiError(400, f"messages[{i}].role: unsupported role {m.role!r} (system, user, assistant)",
                           param=f"messages[{i}].role", code="invalid_role")
        texts, images = [], []
        for j, part in enumerate(m.content if isinstance(m.content, list) else []):
            where = f"messages[{i}].content[{j}]"
            if part.type == "text":
                texts.append(part.text or "")
            elif part.type == "image_url":
                if role != "user":
                    raise ApiError(400, f"{where}: images go in user messages only", param=where, code="invalid_image")
                n_images += 1
                if n_images > cfg.max_images:
                    raise ApiError(400, f"more than {cfg.max_images} images in one request", param=where,
                                   code="too_many_images")
                url = part.image_url.url if isinstance(part.image_url, ImageUrl) else part.image_url
                images.append(await load_image_url(url or "", cfg))
            else:
                raise ApiError(400, f"{where}: unsupported content part type {part.type!r} (text, image_url)",
                               param=where, code="invalid_content")
        if isinstance(m.content, str):
            text = m.content
        else:
            text = "\n".join(without_listings(texts, len(images), record_of(request)))
        messages.append(Message(role, text, images))
    return messages


def without_listings(texts: list[str], n_images: int, record) -> list[str]:
    """The text parts, a part that is only Open WebUI's listing of this message's images left out (one that
    also lists other files keeps those entries)."""
    kept = []
    for text in texts:
        stripped = strip_listing(text, n_images)
        if stripped.n_dropped and not stripped.rest:
            record.attached_files_dropped(stripped.n_dropped)
            text = stripped.listing
            if not text:
                continue
        kept.append(text)
    return kept


# Each answer also carries its engine timings (ttft_ms, prefill_ms, vision_ms, decode_tokens_per_s, ...) as
# "timings", an extension field like llama.cpp's server's: clients that do not know it ignore it.


def usage(timings) -> dict:
    return {"prompt_tokens": timings.n_prompt_tokens, "completion_tokens": timings.n_generated,
            "total_tokens": timings.n_prompt_tokens + timings.n_generated,
            "prompt_tokens_details": {"cached_tokens": timings.n_cached}}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    req = await parse_body(request, ChatRequest)
    if (req.n or 1) != 1:
        raise ApiError(400, "n must be 1: one answer per request", param="n", code="unsupported_n")
    check_tool_choice(req)
    state, record = request.app.state, record_of(request)
    record.tools_ignored(len(req.tools or []))
    ignore_eos = req.ignore_eos or bans_eos_only(req.logit_bias, state.engine.bundle.eos_id)
    sampling = sampling_config(state.cfg, req.max_completion_tokens or req.max_tokens or DEFAULT_MAX_TOKENS,
                               req.temperature, req.top_p, req.seed, req.stop, ignore_eos)
    running = await generation.start(state.engine, await engine_messages(req, request), sampling, state.active,
                                     req.image_tokens)
    rid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), state.cfg.model_name
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = sse_events(running, record, rid, created, model, include_usage)
        return generation.StreamedAnswer(events, running, "text/event-stream")
    text = await running.text(request.receive)
    answer = running.answer
    record.answered(answer.timings)
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text or text},
                         "logprobs": None, "finish_reason": generation.finish_reason(answer)}],
            "usage": usage(answer.timings), "timings": asdict(answer.timings)}


async def sse_events(running, record, rid: str, created: int, model: str, include_usage: bool):
    def event(choices: list, **extra) -> str:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
        if include_usage:
            body["usage"] = None
        body.update(extra)
        return f"data: {json.dumps(body)}\n\n"

    def delta(content: dict, finish: str | None = None) -> list:
        return [{"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}]

    yield event(delta({"role": "assistant", "content": ""}))
    try:
        async for piece in running.pieces():
            yield event(delta({"content": piece}))
    except Exception as e:  # noqa: BLE001 - after the 200 went out, the error travels as an event, as OpenAI's
        err = e if isinstance(e, ApiError) else ApiError(500, f"internal error ({type(e).__name__})")
        record.error = err.message
        yield f"data: {json.dumps(error_body('/v1/chat/completions', err))}\n\n"
        yield "data: [DONE]\n\n"
        return
    answer = running.answer
    record.answered(answer.timings)
    yield event(delta({}, generation.finish_reason(answer)), timings=asdict(answer.timings))
    if include_usage:
        yield event([], usage=usage(answer.timings))
    yield "data: [DONE]\n\n"


@router.get("/v1/models")
async def models(request: Request):
    cfg = request.app.state.cfg
    return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": request.app.state.created,
                                        "owned_by": "llava-edge"}]}
