"""Structured answers at the doors: each API's way of asking for JSON, a schema or a tool call, turned into the
engine's one answer format (SamplingConfig.format), and the answer's log-probabilities in each API's shape.

A forced tool call is a JSON schema too: `{"name": <one of the offered functions>, "arguments": <its
parameters>}`, and the answer is returned as the API's tool call (llama.cpp's server does the same for models
without a tool-call format of their own).
"""

from __future__ import annotations

import json
import uuid

from .api_errors import ApiError


def openai_format(response_format) -> str | dict | None:
    """OpenAI's response_format: {"type": "text"}, {"type": "json_object"} or {"type": "json_schema",
    "json_schema": {"name", "schema", "strict"}}."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict) or not isinstance(response_format.get("type"), str):
        raise ApiError(400, "response_format must be an object with a \"type\" (text, json_object, json_schema)",
                       param="response_format", code="invalid_response_format")
    kind = response_format["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ApiError(400, "response_format.json_schema.schema must be a JSON schema object",
                           param="response_format.json_schema.schema", code="invalid_response_format")
        return schema
    raise ApiError(400, f"response_format.type {kind!r} is not supported (text, json_object, json_schema)",
                   param="response_format.type", code="invalid_response_format")


def ollama_format(fmt) -> str | dict | None:
    """Ollama's format: "json" or a JSON schema ("" and null: none)."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json" or isinstance(fmt, dict):
        return fmt
    shown = repr(fmt)[:40]
    raise ApiError(400, f"format must be \"json\" or a JSON schema object (got {shown})", param="format")


# ---------------------------------------------------------------------------------------------------- tool calls

def functions_of(tools: list[dict] | None, where: str = "tools") -> dict[str, dict]:
    """name -> parameters schema of each offered function (OpenAI's and Ollama's tools have the same shape)."""
    out = {}
    for i, tool in enumerate(tools or []):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ApiError(400, f"{where}[{i}]: a tool is {{\"type\": \"function\", \"function\": {{\"name\", "
                                "\"parameters\"}}}}", param=f"{where}[{i}]", code="invalid_tools")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise ApiError(400, f"{where}[{i}].function.parameters must be a JSON schema object",
                           param=f"{where}[{i}].function.parameters", code="invalid_tools")
        out[fn["name"]] = params
    return out


def called_functions(tools: list[dict] | None, tool_choice) -> dict[str, dict] | None:
    """The functions the answer must call one of (None: a plain answer). tool_choice "required" (or
    Ollama-style, see ollama_api) means any offered function; {"type": "function", "function": {"name"}} that
    one; "auto", "none" and no tool_choice leave the answer free."""
    if tool_choice in (None, "auto", "none"):
        return None
    functions = functions_of(tools)
    if tool_choice == "required":
        if not functions:
            raise ApiError(400, "tool_choice \"required\" needs tools", param="tool_choice",
                           code="unsupported_tool_choice")
        return functions
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(name, str):
        raise ApiError(400, "tool_choice must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", "
                            "\"function\": {\"name\": ...}}", param="tool_choice", code="unsupported_tool_choice")
    if name not in functions:
        raise ApiError(400, f"tool_choice names {name!r}, which is not among the tools", param="tool_choice",
                       code="unsupported_tool_choice")
    return {name: functions[name]}


def tool_call_schema(functions: dict[str, dict]) -> dict:
    calls = [{"type": "object", "properties": {"name": {"const": name}, "arguments": params},
              "required": ["name", "arguments"], "additionalProperties": False}
             for name, params in functions.items()]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def parsed_call(text: str) -> tuple[str, dict] | None:
    """(name, arguments) of an answer held to tool_call_schema; None when it was cut short (max_tokens)."""
    try:
        call = json.loads(text)
    except json.JSONDecodeError:
        return None
    return call["name"], call["arguments"]


def openai_tool_calls(text: str) -> list[dict] | None:
    call = parsed_call(text)
    if call is None:
        return None
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": call[0], "arguments": json.dumps(call[1])}}]


def ollama_tool_calls(text: str) -> list[dict] | None:
    call = parsed_call(text)
    return None if call is None else [{"function": {"name": call[0], "arguments": call[1]}}]


# ---------------------------------------------------------------------------------------------------- logprobs

def _token(piece: bytes) -> dict:
    return {"token": piece.decode("utf-8", "replace"), "bytes": list(piece)}


def logprob_entries(entries, piece) -> list[dict]:
    """Answer tokens' log-probabilities as OpenAI's logprobs.content (Ollama's logprobs list has the same
    entries): token, logprob, bytes, top_logprobs."""
    return [{**_token(piece(e.token)), "logprob": e.logprob,
             "top_logprobs": [{**_token(piece(t)), "logprob": lp} for t, lp in e.top]}
            for e in entries]
