"""Open WebUI's default request bodies (recorded from Open WebUI 0.12.4: tests/data/openwebui), replayed with the
official `openai` and `ollama` clients through both connectors of a real `llava-edge serve`: the answers to the
demo's questions equal those of clean greedy requests, whatever the tools, the <attached_files> listing and the
missing temperature; the background title/tags/follow-up requests get each API's answer to a long prompt; and
the serve log has one line per request that says all of this."""

from __future__ import annotations

import base64
import json
import re
import time
from pathlib import Path

import httpx
import openai
import pytest

from server_process import EXAMPLES, SUFFIX, chat_cli_answer, data_uri

DATA = Path(__file__).parent / "data" / "openwebui"
# The questions and images the README shows for the demo
CASES = [
    ("green_triangle.png", "Describe the image."),
    ("red_circle_blue_triangle.png", "Describe the image."),
    ("yellow_triangle_red_circle_blue_square.png", "Describe the image."),
    ("yellow_triangle_red_circle_blue_square.png", "How many shapes are there?" + SUFFIX),
    ("yellow_triangle_red_circle_blue_square.png", "What shape is the blue object?" + SUFFIX),
    ("red_circle_blue_triangle.png", "What color is the triangle?" + SUFFIX),
]
FOLLOW_UP = "What color is the circle?" + SUFFIX
TASKS = ("title", "tags", "follow_ups")


def recorded(name: str, image: str, question: str = "", answer: str = "", follow_up: str = "") -> dict:
    """A recorded body with its placeholders filled (each value JSON-escaped into the JSON text)."""
    text = (DATA / f"{name}.json").read_text()
    values = {"IMAGE_DATA_URI": data_uri(EXAMPLES / image),
              "IMAGE_BASE64": base64.b64encode((EXAMPLES / image).read_bytes()).decode(),
              "IMAGE_NAME": image, "QUESTION": question, "ANSWER": answer, "FOLLOW_UP": follow_up}
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", json.dumps(value)[1:-1])
    assert "{{" not in text, name
    return json.loads(text)


def openai_answer(client, body: dict) -> str:
    reply = client.chat.completions.create(**body)
    if body.get("stream"):
        return "".join(chunk.choices[0].delta.content or "" for chunk in reply if chunk.choices)
    return reply.choices[0].message.content


def ollama_answer(client, body: dict) -> str:
    reply = client.chat(**body)
    if body.get("stream", True):
        return "".join(part.message.content for part in reply)
    return reply.message.content


def clean_openai(client, image: str, turns: list[str], answers: list[str] = ()) -> str:
    messages = [{"role": "user", "content": [{"type": "text", "text": turns[0]},
                                             {"type": "image_url", "image_url": {"url": data_uri(EXAMPLES / image)}}]}]
    for answer, turn in zip(answers, turns[1:]):
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": turn}]
    return client.chat.completions.create(model="m", messages=messages, temperature=0).choices[0].message.content


def clean_ollama(client, image: str, turns: list[str], answers: list[str] = ()) -> str:
    messages = [{"role": "user", "content": turns[0], "images": [str(EXAMPLES / image)]}]
    for answer, turn in zip(answers, turns[1:]):
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": turn}]
    return client.chat(model="m", messages=messages, options={"temperature": 0}).message.content


def test_the_recorded_bodies_are_open_webuis_defaults():
    for connector in ("openai", "ollama"):
        body = recorded(f"{connector}_chat_1", "green_triangle.png", "Q")
        assert len(body["tools"]) == 36 and "temperature" not in body and not body.get("options")
        first = body["messages"][0]["content"]
        listing = first[0]["text"] if connector == "openai" else first
        assert listing.startswith("<attached_files>\n<file ") and 'name="green_triangle.png"' in listing


@pytest.mark.parametrize("image, question", CASES)
def test_chat_through_the_openai_connector_answers_as_a_clean_greedy_request(openai_client, image, question):
    expected = clean_openai(openai_client, image, [question])
    assert openai_answer(openai_client, recorded("openai_chat_1", image, question)) == expected


@pytest.mark.parametrize("image, question", CASES)
def test_chat_through_the_ollama_connector_answers_as_a_clean_greedy_request(ollama_client, image, question):
    expected = clean_ollama(ollama_client, image, [question])
    assert ollama_answer(ollama_client, recorded("ollama_chat_1", image, question)) == expected


def test_the_clean_answers_are_the_chat_commands(openai_client):
    image, question = CASES[5]
    assert clean_openai(openai_client, image, [question]) == chat_cli_answer(EXAMPLES / image, question)


def test_the_follow_up_answers_as_a_clean_greedy_conversation(openai_client, ollama_client):
    image, first = "red_circle_blue_triangle.png", "Describe the image."
    answer = clean_openai(openai_client, image, [first])
    expected = clean_openai(openai_client, image, [first, FOLLOW_UP], [answer])
    assert clean_ollama(ollama_client, image, [first, FOLLOW_UP], [answer]) == expected
    assert openai_answer(openai_client, recorded("openai_chat_2", image, first, answer, FOLLOW_UP)) == expected
    assert ollama_answer(ollama_client, recorded("ollama_chat_2", image, first, answer, FOLLOW_UP)) == expected


def test_background_tasks_get_each_apis_answer_to_a_long_prompt(server, openai_client, ollama_client):
    n_ctx = 512  # the demo bundle's context
    for task in TASKS:
        body = recorded(f"openai_{task}", "green_triangle.png")
        with pytest.raises(openai.BadRequestError) as refused:
            openai_answer(openai_client, body)
        assert refused.value.code == "context_length_exceeded"
        assert f"the context holds {n_ctx}" in refused.value.message
        reply = ollama_client.chat(**recorded(f"ollama_{task}", "green_triangle.png"))
        assert reply.done and reply.message.content and reply.prompt_eval_count < n_ctx
    cut = [line for line in server.stderr().splitlines() if "POST /api/chat 200" in line and "prompt_cut=" in line]
    assert len(cut) >= len(TASKS)


def test_one_log_line_per_request_says_what_the_server_did(server, openai_client):
    before = len(log_lines(server))
    openai_answer(openai_client, recorded("openai_chat_1", "green_triangle.png", "Describe the image."))
    openai_client.models.list()
    httpx.post(f"{server.url}/v1/chat/completions", json={"messages": []}, timeout=30)
    deadline = time.monotonic() + 10  # a line is written when its response is done: give the last one time
    while len(lines := log_lines(server)[before:]) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(lines) == 3, lines
    chat, models, bad = lines
    assert re.search(r" POST /v1/chat/completions 200 \d+\.\d\ds prompt=\d+ cached=\d+ generated=\d+ "
                     r"tools_ignored=36 attached_files_dropped=1$", chat), chat
    assert re.search(r" GET /v1/models 200 \d+\.\d\ds$", models), models
    assert re.search(r' POST /v1/chat/completions 422 \d+\.\d\ds error="messages: .+"$', bad), bad
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert counter(metrics, "llava_edge_tools_ignored_total") >= 36
    assert counter(metrics, "llava_edge_attached_files_dropped_total") >= 1


def log_lines(server) -> list[str]:
    return [line for line in server.stderr().splitlines() if re.match(r"llava-edge serve: \d{4}-\d\d-\d\d ", line)]


def counter(metrics: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", metrics, re.M).group(1))
