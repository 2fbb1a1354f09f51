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
from . import answers, structured
from .api_errors import ApiError, error_body
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
    tools: list[dict] | None = None  # called when tool_choice demands a call; else ignored (docs/server-clients.md)
    tool_choice: str | dict | None = None
    response_format: Any = None  # text, json_object, json_schema (structured.openai_format)
    logprobs: bool | None = None
    top_logprobs: int | None = None  # 0..20 (checked by SamplingConfig: 400 when bad)
    image_tokens: Any = None  # llava-edge's extension: tokens per image (checked by the engine: 400 when bad)


# fields that change an answer and that this server does not honour: named in the request's log line
NOT_HONOURED = ("frequency_penalty", "presence_penalty")


def bans_eos_only(logit_bias: dict[str, float] | None, eos_id: int) -> bool:
    """logit_bias is supported for one use, {EOS: -100}: an answer that runs to max_tokens."""
    if not logit_bias:
        return False
    if set(logit_bias) != {str(eos_id)} or logit_bias[str(eos_id)] > -100:
        raise ApiError(400, f"logit_bias: only banning the end-of-sequence token ({{\"{eos_id}\": -100}}) is supported",
                       param="logit_bias", code="unsupported_logit_bias")
    return True


def answer_format(req: ChatRequest) -> tuple[str | dict | None, bool]:
    """The engine's answer format, and whether the answer is a tool call: a tool_choice that demands a call
    holds the answer to a call of an offered function; else response_format."""
    functions = structured.called_functions(req.tools, req.tool_choice)
    if functions is not None:
        return structured.tool_call_schema(functions), True
    return structured.openai_format(req.response_format), False


def logprob_settings(req: ChatRequest) -> dict:
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_logprobs")
    return {"logprobs": bool(req.logprobs), "top_logprobs": req.top_logprobs}


def ignored_fields(req: ChatRequest) -> list[str]:
    return [name for name in NOT_HONOURED if req.model_extra.get(name) not in (None, 0, 0.0)]


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
    fmt, tool_call = answer_format(req)
    state, record = request.app.state, record_of(request)
    record.tools_ignored(0 if tool_call else len(req.tools or []))
    record.fields_ignored(ignored_fields(req))
    ignore_eos = req.ignore_eos or bans_eos_only(req.logit_bias, state.engine.bundle.eos_id)
    sampling = sampling_config(state.cfg, req.max_completion_tokens or req.max_tokens or DEFAULT_MAX_TOKENS,
                               req.temperature, req.top_p, req.seed, req.stop, ignore_eos, format=fmt,
                               **logprob_settings(req))
    running = await answers.start(state.engine, await engine_messages(req, request), sampling, state.active,
                                     req.image_tokens)
    rid, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), state.cfg.model_name
    piece = state.engine.tokenizer.piece
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        events = sse_events(running, record, rid, created, model, include_usage, piece, tool_call)
        return answers.StreamedAnswer(events, running, "text/event-stream")
    text = await running.text(request.receive)
    answer = running.answer
    record.answered(answer.timings)
    message, finish = reply(answer.text or text, answers.finish_reason(answer), tool_call)
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": logprobs_of(running, piece, 0),
                         "finish_reason": finish}],
            "usage": usage(answer.timings), "timings": asdict(answer.timings)}


def reply(text: str, finish: str, tool_call: bool) -> tuple[dict, str]:
    """The assistant message and finish reason: a finished forced call as tool_calls, else the text."""
    calls = structured.openai_tool_calls(text) if tool_call and finish == "stop" else None
    if calls is None:
        return {"role": "assistant", "content": text}, finish
    return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"


def logprobs_of(running, piece, start: int) -> dict | None:
    """OpenAI's choice.logprobs for the answer tokens from `start` on (None when not asked for)."""
    if not running.gen.sampling.logprobs:
        return None
    return {"content": structured.logprob_entries(running.gen.logprobs[start:], piece), "refusal": None}


async def sse_events(running, record, rid: str, created: int, model: str, include_usage: bool, piece,
                     tool_call: bool):
    def event(choices: list, **extra) -> str:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
        if include_usage:
            body["usage"] = None
        body.update(extra)
        return f"data: {json.dumps(body)}\n\n"

    sent = 0  # answer tokens whose logprobs went out

    def delta(content: dict, finish: str | None = None) -> list:
        nonlocal sent
        logprobs = logprobs_of(running, piece, sent)
        sent = len(running.gen.logprobs)
        return [{"index": 0, "delta": content, "logprobs": logprobs, "finish_reason": finish}]

    yield event(delta({"role": "assistant", "content": ""}))
    texts = []
    try:
        async for text in running.pieces():
            texts.append(text)
            if not tool_call:  # a call goes out whole, once it is complete
                yield event(delta({"content": text}))
    except Exception as e:  # noqa: BLE001 - after the 200 went out, the error travels as an event, as OpenAI's
        err = e if isinstance(e, ApiError) else ApiError(500, f"internal error ({type(e).__name__})")
        record.error = err.message
        yield f"data: {json.dumps(error_body('/v1/chat/completions', err))}\n\n"
        yield "data: [DONE]\n\n"
        return
    answer = running.answer
    record.answered(answer.timings)
    finish = answers.finish_reason(answer)
    if tool_call:
        message, finish = reply("".join(texts), finish, tool_call)
        calls = [{"index": 0, **c} for c in message.get("tool_calls", [])]
        yield event(delta({"tool_calls": calls} if calls else {"content": message["content"]}))
    yield event(delta({}, finish), timings=asdict(answer.timings))
    if include_usage:
        yield event([], usage=usage(answer.timings))
    yield "data: [DONE]\n\n"


@router.get("/v1/models")
async def models(request: Request):
    cfg = request.app.state.cfg
    return {"object": "list", "data": [{"id": cfg.model_name, "object": "model", "created": request.app.state.created,
                                        "owned_by": "llava-edge"}]}
