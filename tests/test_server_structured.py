"""Structured answers through the official clients against a real `llava-edge serve` (demo bundle, 4 slots):
OpenAI's response_format and .parse(), Ollama's format, logprobs in both shapes, forced tool calls, and a 400
that names the problem for what cannot be served."""

from __future__ import annotations

import base64
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, Field

from server_process import EXAMPLES, SUFFIX, image_part

SERVE_ARGS = ("--parallel", "4")
IMAGE = EXAMPLES / "red_circle_blue_triangle.png"


class Shapes(BaseModel):
    shape: Literal["circle", "square", "triangle"]
    color: Literal["red", "green", "blue", "yellow"]
    count: int = Field(ge=1, le=3)


class ShapesByName(BaseModel):
    """For the ollama package's tools: its tool type keeps a property's type, enum and description only (a
    minimum or maximum never reaches the server)."""
    shape: Literal["circle", "square", "triangle"]
    color: Literal["red", "green", "blue", "yellow"]
    count: Literal[1, 2, 3]


SCHEMA = Shapes.model_json_schema()


def user(text: str, image=IMAGE) -> list[dict]:
    return [{"role": "user", "content": [image_part(image), {"type": "text", "text": text}]}]


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


@pytest.mark.slow
def test_openai_parse_with_a_pydantic_model_and_an_image(openai_client):
    done = openai_client.chat.completions.parse(model="llava-edge-demo", messages=user("Describe the image."),
                                                response_format=Shapes, temperature=0)
    choice = done.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Shapes)


@pytest.mark.slow
def test_openai_json_object_streams_to_valid_json_and_max_tokens_ends_as_length(openai_client):
    chunks = list(openai_client.chat.completions.create(
        model="m", messages=user("Describe the image."), response_format={"type": "json_object"}, stream=True,
        temperature=0))
    assert isinstance(json.loads("".join(c.choices[0].delta.content or "" for c in chunks)), dict)
    cut = openai_client.chat.completions.create(
        model="m", messages=user("Describe the image."), max_tokens=3, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "shapes", "schema": SCHEMA, "strict": True}})
    assert cut.choices[0].finish_reason == "length"
    with pytest.raises(json.JSONDecodeError):
        json.loads(cut.choices[0].message.content)


@pytest.mark.slow
def test_openai_logprobs_streamed_and_not_agree(openai_client):
    kw = dict(model="m", messages=user("What color is the circle?" + SUFFIX), temperature=0, logprobs=True,
              top_logprobs=3)
    whole = openai_client.chat.completions.create(**kw)
    entries = whole.choices[0].logprobs.content
    assert len(entries) == whole.usage.completion_tokens >= 1
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.logprob for e in entries)
    assert whole.choices[0].message.content.startswith(entries[0].token.lstrip())
    streamed = [e for c in openai_client.chat.completions.create(**kw, stream=True)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]


@pytest.mark.slow
def test_openai_forced_tool_call(openai_client):
    tools = [{"type": "function", "function": {"name": "report_shape", "parameters": SCHEMA}},
             {"type": "function", "function": {"name": "other", "parameters": {"type": "object", "properties": {}}}}]
    done = openai_client.chat.completions.create(
        model="m", messages=user("Describe the image."), tools=tools, temperature=0,
        tool_choice={"type": "function", "function": {"name": "report_shape"}})
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name == "report_shape"
    jsonschema.validate(json.loads(call.function.arguments), SCHEMA)
    chunks = [c for c in openai_client.chat.completions.create(
        model="m", messages=user("Describe the image."), tools=tools, temperature=0, stream=True,
        tool_choice={"type": "function", "function": {"name": "report_shape"}}) if c.choices]
    streamed = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
    assert [c.choices[0].finish_reason for c in chunks][-1] == "tool_calls"
    assert [(t.function.name, t.function.arguments) for t in streamed] == [("report_shape", call.function.arguments)]


@pytest.mark.parametrize("body, words", [
    ({"response_format": {"type": "yaml"}}, "response_format.type 'yaml' is not supported"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "json_schema.schema must be"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=a)b"}}}}}}, "not supported"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs must be an integer from 0 to 20"),
    ({"tool_choice": "required"}, "tool_choice \"required\" needs tools"),
])
def test_openai_bad_structured_requests_are_400_naming_the_problem(server, body, words):
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                   json={"messages": user("Describe the image."), **body})
    assert r.status_code == 400, r.text
    assert words in r.json()["error"]["message"]


@pytest.mark.slow
def test_ollama_chat_with_a_schema_and_generate_in_json_mode(ollama_client):
    done = ollama_client.chat(model="m", format=SCHEMA, options={"temperature": 0},
                              messages=[{"role": "user", "content": "Describe the image.", "images": [IMAGE]}])
    Shapes.model_validate_json(done.message.content)
    gen = ollama_client.generate(model="m", prompt="Describe the image.", images=[IMAGE], format="json")
    assert isinstance(json.loads(gen.response), dict)


@pytest.mark.slow
def test_ollama_logprobs_in_its_shape(ollama_client):
    done = ollama_client.chat(model="m", logprobs=True, top_logprobs=2, options={"temperature": 0},
                              messages=[{"role": "user", "content": "What color is the circle?" + SUFFIX,
                                         "images": [IMAGE]}])
    assert len(done.logprobs) == done.eval_count >= 1
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.logprob for e in done.logprobs)
    streamed = [e for part in ollama_client.chat(model="m", logprobs=True, top_logprobs=2, stream=True,
                                                 options={"temperature": 0},
                                                 messages=[{"role": "user", "content": "What color is the circle?"
                                                            + SUFFIX, "images": [IMAGE]}])
                for e in part.logprobs or []]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in done.logprobs]


@pytest.mark.parametrize("body, words", [
    ({"format": "yaml"}, "format must be \"json\" or a JSON schema"),
    ({"format": ["json"]}, "format must be"),
    ({"format": {"type": "object", "properties": {"a": {"type": "string", "format": "bogus-format"}}}},
     "not supported"),
    ({"options": {"top_k": -1}}, "top-k must be"),
    ({"options": {"repeat_penalty": 0}}, "repeat penalty must be"),
])
def test_ollama_bad_structured_requests_are_400_naming_the_problem(server, body, words):
    """Raw bodies: the ollama package itself refuses a format that is neither "json" nor an object."""
    for path, request in [("/api/chat", {"messages": [{"role": "user", "content": "Describe the image.",
                                                       "images": [b64(IMAGE)]}]}),
                          ("/api/generate", {"prompt": "Describe the image.", "images": [b64(IMAGE)]})]:
        r = httpx.post(f"{server.url}{path}", json={"model": "m", **request, **body}, timeout=60)
        assert r.status_code == 400 and words in r.json()["error"], (path, r.text)


@pytest.mark.slow
def test_constrained_and_free_requests_at_once_free_answers_equal_serial(openai_client):
    questions = ["Describe the image.", "How many shapes are there?" + SUFFIX]
    images = sorted(EXAMPLES.glob("*.png"))[:2]

    def free(image, q):
        return openai_client.chat.completions.create(model="m", messages=user(q, image),
                                                     temperature=0).choices[0].message.content

    def held(image):
        return openai_client.chat.completions.parse(model="m", messages=user("Describe the image.", image),
                                                    response_format=Shapes, temperature=0).choices[0].message.parsed

    serial = {(i, q): free(i, q) for i in images for q in questions}
    with ThreadPoolExecutor(8) as pool:
        free_jobs = {(i, q): pool.submit(free, i, q) for i in images for q in questions}
        held_jobs = [pool.submit(held, i) for i in images for _ in range(2)]
        assert {k: f.result() for k, f in free_jobs.items()} == serial
        assert all(isinstance(h.result(), Shapes) for h in held_jobs)


def image_message_lc():
    from langchain_core.messages import HumanMessage

    return [HumanMessage(content=[{"type": "text", "text": "Describe the image."},
                                  {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(IMAGE)}"}}])]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["default", "function_calling"])
def test_langchain_structured_output_through_both_connectors(server, method):
    from langchain_ollama import ChatOllama
    from langchain_openai import ChatOpenAI

    kw = {} if method == "default" else {"method": method}
    for llm in (ChatOllama(model="m", base_url=server.url, temperature=0),
                ChatOpenAI(model="m", base_url=f"{server.url}/v1", api_key="unused", temperature=0, max_retries=0)):
        got = llm.with_structured_output(ShapesByName, **kw).invoke(image_message_lc())
        assert isinstance(got, ShapesByName), (type(llm).__name__, got)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["TOOLS", "JSON_SCHEMA"])
def test_instructor_modes(openai_client, mode):
    import instructor

    client = instructor.from_openai(openai_client, mode=getattr(instructor.Mode, mode))
    got = client.chat.completions.create(model="m", response_model=Shapes, messages=user("Describe the image."),
                                         temperature=0, max_retries=0)
    assert isinstance(got, Shapes)
