"""Ollama's API: POST /api/chat and /api/generate (base64 images, NDJSON streaming by default), GET /api/tags,
GET /api/version, GET /api/ps, POST /api/show. Durations are in nanoseconds, as Ollama reports them."""

from __future__ import annotations

from typing import Any

import json
import time
from datetime import datetime, timezone

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..runtime import Message
from . import answers, structured
from .attached_files import strip_listing
from .api_errors import ApiError
from .media import decode_base64
from .parsing import parse_body, sampling_config
from .request_log import record_of
from .truncation import start_fitting

router = APIRouter()

ROLES = ("system", "user", "assistant")
UNLIMITED = 1 << 20  # num_predict -1 / -2: until EOS or the context is full


class Options(BaseModel):
    model_config = ConfigDict(extra="allow")  # num_ctx, num_thread, ...: accepted, no bearing on the answer
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    num_predict: int | None = None
    stop: str | list[str] | None = None
    top_k: int | None = None  # these four are checked by SamplingConfig (400 when bad)
    min_p: float | None = None
    repeat_penalty: float | None = None
    repeat_last_n: int | None = None
    image_tokens: Any = None  # llava-edge's extension: tokens per image (checked by the engine: 400 when bad)


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str = ""
    images: list[str] | None = None


class BaseRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # keep_alive, think, ...
    model: str = ""
    stream: bool = True
    options: Options | None = None
    format: Any = None  # "json" or a JSON schema (structured.ollama_format)
    logprobs: bool | None = None  # Ollama >= 0.12.11
    top_logprobs: int | None = None


class ChatRequest(BaseRequest):
    messages: list[OllamaMessage] = []
    tools: list[dict] | None = None  # accepted and ignored: the model cannot call tools (docs/server-clients.md)
    truncate: bool = True  # Ollama's: drop the oldest messages when the conversation exceeds the context


class GenerateRequest(BaseRequest):
    prompt: str = ""
    images: list[str] | None = None
    system: str | None = None
    raw: bool = False
    context: list[int] | None = None


class ShowRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = ""
    name: str = ""


def tagged(name: str) -> str:
    return name if ":" in name else f"{name}:latest"


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# options that change an answer and that this server does not honour: named in the request's log line
NOT_HONOURED = ("presence_penalty", "frequency_penalty", "penalize_newline", "typical_p", "tfs_z", "mirostat",
                "mirostat_tau", "mirostat_eta")


def images_of(encoded: list[str] | None, where: str, cfg, count: list[int]) -> list[bytes]:
    out = []
    for k, text in enumerate(encoded or []):
        count[0] += 1
        if count[0] > cfg.max_images:
            raise ApiError(400, f"more than {cfg.max_images} images in one request")
        out.append(decode_base64(text, f"{where}.images[{k}]"))
    return out


def sampling_of(cfg, req: BaseRequest, fmt=None):
    o = req.options or Options()
    n = o.num_predict if o.num_predict is not None and o.num_predict > 0 else UNLIMITED
    return sampling_config(cfg, n, o.temperature, o.top_p, o.seed, o.stop, format=fmt, top_k=o.top_k,
                           min_p=o.min_p, repeat_penalty=o.repeat_penalty, repeat_last_n=o.repeat_last_n,
                           logprobs=bool(req.logprobs or req.top_logprobs), top_logprobs=req.top_logprobs)


def ignored_options(options: Options | None) -> list[str]:
    extra = options.model_extra if options is not None else {}
    return [name for name in NOT_HONOURED if extra.get(name) not in (None, 0, 0.0, False)]


def final_stats(answer, t_start: float) -> dict:
    t = answer.timings
    eval_ns = int(1e9 * (t.n_generated - 1) / t.decode_tokens_per_s) if t.decode_tokens_per_s > 0 else 0
    return {"done": True, "done_reason": answers.finish_reason(answer),
            "total_duration": int(1e9 * (time.perf_counter() - t_start)), "load_duration": 0,
            "prompt_eval_count": t.n_prompt_tokens, "prompt_eval_duration": int(1e6 * t.ttft_ms),
            "eval_count": t.n_generated, "eval_duration": eval_ns}


async def answer(request: Request, req: BaseRequest, messages: list[Message], wrap, t_start: float,
                 truncate: bool = False, fmt=None, finish=None):
    """Run one request; `wrap(text)` is the API's own text field ({"message": ...} or {"response": ...});
    with `truncate` the oldest messages are dropped until the conversation fits the context. fmt: the answer's
    format; finish(text, done_reason): the final message's fields (a tool call's)."""
    state, record = request.app.state, record_of(request)
    model = tagged(state.cfg.model_name)
    sampling = sampling_of(state.cfg, req, fmt)
    record.fields_ignored(ignored_options(req.options))
    piece = state.engine.tokenizer.piece
    if truncate:
        image_tokens = req.options.image_tokens if req.options else None
        fitted = await start_fitting(state.engine, messages, sampling, state.active, image_tokens)
        record.truncated(fitted.n_dropped, fitted.cut_from)
        running = fitted.running
    else:
        image_tokens = req.options.image_tokens if req.options else None
        running = await answers.start(state.engine, messages, sampling, state.active, image_tokens)
    sent = 0

    def logprobs() -> dict:
        nonlocal sent
        entries, sent = running.gen.logprobs[sent:], len(running.gen.logprobs)
        return {"logprobs": structured.logprob_entries(entries, piece)} if sampling.logprobs else {}

    if not req.stream:
        await running.text(request.receive)
        record.answered(running.answer.timings)
        text = running.answer.text
        final = finish(text, answers.finish_reason(running.answer)) if finish else wrap(text)
        return {"model": model, "created_at": now(), **final, **logprobs(), **final_stats(running.answer, t_start)}

    async def lines():
        texts = []
        try:
            async for text in running.pieces():
                texts.append(text)
                if finish is None:
                    yield json.dumps({"model": model, "created_at": now(), **wrap(text), **logprobs(),
                                      "done": False}) + "\n"
        except Exception as e:  # noqa: BLE001 - after the 200 went out: Ollama sends {"error"} as a line
            record.error = e.message if isinstance(e, ApiError) else f"internal error ({type(e).__name__})"
            yield json.dumps({"error": record.error}) + "\n"
            return
        record.answered(running.answer.timings)
        final = finish("".join(texts), answers.finish_reason(running.answer)) if finish else wrap("")
        yield json.dumps({"model": model, "created_at": now(), **final, **logprobs(),
                          **final_stats(running.answer, t_start)}) + "\n"

    return answers.StreamedAnswer(lines(), running, "application/x-ndjson")


def loaded(model: str, wrap, req: BaseRequest) -> dict:
    """Ollama's answer to a request with nothing to say: the model is loaded (or, keep_alive 0, "unloaded":
    this server keeps its one model loaded)."""
    reason = "unload" if req.model_extra.get("keep_alive") in (0, "0") else "load"
    return {"model": model, "created_at": now(), **wrap(""), "done": True, "done_reason": reason}


def chat_format(req: ChatRequest):
    """The answer's format, and for a forced tool call the final message's maker. Ollama's API has no
    tool_choice, and this model has no tool-call format to choose with: one tool offered is called (LangChain's
    ChatOllama sends its structured-output tool so, dropping its tool_choice); several (Open WebUI's 36) leave the
    answer free, unless the body carries OpenAI's tool_choice."""
    choice = req.model_extra.get("tool_choice")
    if choice is None and len(req.tools or []) == 1:
        choice = "required"
    functions = structured.called_functions(req.tools, choice)
    if functions is None:
        return structured.ollama_format(req.format), None

    def finish(text: str, reason: str) -> dict:
        calls = structured.ollama_tool_calls(text) if reason == "stop" else None
        message = {"role": "assistant", "content": "" if calls else text}
        return {"message": {**message, "tool_calls": calls} if calls else message}

    return structured.tool_call_schema(functions), finish


@router.post("/api/chat")
async def chat(request: Request):
    t_start = time.perf_counter()
    req = await parse_body(request, ChatRequest)
    fmt, finish = chat_format(req)

    def wrap(text: str) -> dict:
        return {"message": {"role": "assistant", "content": text}}

    if not req.messages:
        return loaded(tagged(request.app.state.cfg.model_name), wrap, req)
    record = record_of(request)
    record.tools_ignored(0 if finish else len(req.tools or []))
    messages, count = [], [0]
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            raise ApiError(400, f"messages[{i}].role: unsupported role {m.role!r} (system, user, assistant)")
        if m.images and m.role != "user":
            raise ApiError(400, f"messages[{i}]: images go in user messages only")
        images = images_of(m.images, f"messages[{i}]", request.app.state.cfg, count)
        stripped = strip_listing(m.content, len(images))  # Open WebUI's listing of these images, if it leads
        record.attached_files_dropped(stripped.n_dropped)
        messages.append(Message(m.role, stripped.text, images))
    return await answer(request, req, messages, wrap, t_start, truncate=req.truncate, fmt=fmt, finish=finish)


@router.post("/api/generate")
async def generate(request: Request):
    t_start = time.perf_counter()
    req = await parse_body(request, GenerateRequest)
    fmt = structured.ollama_format(req.format)
    if req.raw or req.context:
        raise ApiError(400, "raw prompts and context are not supported: send the conversation to /api/chat")

    def wrap(text: str) -> dict:
        return {"response": text}

    if not req.prompt and not req.images:
        return loaded(tagged(request.app.state.cfg.model_name), wrap, req)
    messages = [Message("system", req.system)] if req.system else []
    messages.append(Message("user", req.prompt, images_of(req.images, "images", request.app.state.cfg, [0])))
    return await answer(request, req, messages, wrap, t_start, fmt=fmt)


def details(bundle) -> dict:
    return {"parent_model": "", "format": "gguf", "family": "llama", "families": ["llama", "clip"],
            "parameter_size": "", "quantization_level": bundle.quant}


def model_entry(request: Request) -> dict:
    state = request.app.state
    files = state.engine.bundle.manifest.get("files", {})
    return {"name": tagged(state.cfg.model_name), "model": tagged(state.cfg.model_name),
            "size": sum(int(f.get("bytes", 0)) for f in files.values()),
            "digest": files.get("decoder", {}).get("sha256", ""), "details": details(state.engine.bundle)}


@router.get("/api/tags")
async def tags(request: Request):
    return {"models": [{**model_entry(request), "modified_at": request.app.state.modified_at}]}


@router.get("/api/ps")
async def running_models(request: Request):
    """The loaded models: always the one this server serves, on the CPU as far as Ollama's fields go."""
    return {"models": [{**model_entry(request), "expires_at": "9999-12-31T23:59:59Z", "size_vram": 0,
                        "context_length": request.app.state.engine.n_ctx_seq}]}


@router.get("/api/version")
async def version():
    return {"version": __version__}


@router.post("/api/show")
async def show(request: Request):
    await parse_body(request, ShowRequest)
    state = request.app.state
    bundle = state.engine.bundle
    return {"modelfile": "", "parameters": "", "template": bundle.template, "modified_at": state.modified_at,
            "details": details(bundle), "capabilities": ["completion", "vision"],
            "model_info": {"general.architecture": "llama", "llama.context_length": bundle.n_ctx_train,
                           "llama.embedding_length": bundle.n_embd,
                           "clip.vision.image_size": bundle.vision.image_size}}
