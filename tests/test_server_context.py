"""A conversation longer than the context (the demo bundle's 512 positions), as each API's reference answers
it: OpenAI refuses it (400 context_length_exceeded); Ollama drops the oldest messages, keeping the system
message and the last one, and cuts the start of a last message that alone is too long; `"truncate": false`
refuses. Checked against the plain path: the same conversations sent with truncate off."""

from __future__ import annotations

import base64

import httpx
import openai
import pytest

from server_process import EXAMPLES, SUFFIX

N_CTX = 512
IMAGES = sorted(EXAMPLES.glob("*.png"))


def b64(path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def long_chat() -> list[dict]:
    """A system message, then turns with an image each (64 positions) and long answers: over 512 in all."""
    messages = [{"role": "system", "content": "You describe coloured shapes."}]
    for image in IMAGES[:3]:  # with the last question's, the 4 images a request may have
        messages += [{"role": "user", "content": "Describe the image.", "images": [b64(image)]},
                     {"role": "assistant", "content": "A red circle and a blue triangle. " * 20}]
    messages.append({"role": "user", "content": "What color is the triangle?" + SUFFIX, "images": [b64(IMAGES[0])]})
    return messages


def chat(server, messages, **extra) -> httpx.Response:
    return httpx.post(f"{server.url}/api/chat", timeout=120,
                      json={"messages": messages, "stream": False, "options": {"temperature": 0}, **extra})


def test_openai_refuses_with_context_length_exceeded(openai_client):
    with pytest.raises(openai.BadRequestError) as refused:
        openai_client.chat.completions.create(model="m", messages=[{"role": "user", "content": "shape " * 600}])
    assert refused.value.code == "context_length_exceeded" and refused.value.param == "messages"


def test_ollama_drops_the_oldest_messages_as_ollama_does(server):
    messages = long_chat()
    refused = chat(server, messages, truncate=False)
    assert refused.status_code == 400 and "the context holds 512" in refused.json()["error"]  # too long as it is
    # The oracle, through the path that never truncates: the longest tail (system message in front) that fits
    for n in range(2, len(messages)):
        tail = [messages[0]] + messages[n:]
        fits = chat(server, tail, truncate=False)
        if fits.status_code == 200:
            break
    assert n > 2, "the conversation should need more than one message dropped"
    reply = chat(server, messages)
    assert reply.status_code == 200, reply.text
    assert reply.json()["message"] == fits.json()["message"]
    assert reply.json()["prompt_eval_count"] == fits.json()["prompt_eval_count"]
    assert [line for line in server.stderr().splitlines() if f"truncated={n - 1}" in line]


def test_ollama_cuts_the_start_of_a_last_message_too_long_alone(server):
    question = "What color is the triangle?" + SUFFIX
    long_text = "Describe the shapes. " * 200 + question
    refused = chat(server, [{"role": "user", "content": long_text}], truncate=False)
    assert refused.status_code == 400 and "the context holds 512" in refused.json()["error"]
    reply = chat(server, [{"role": "user", "content": long_text, "images": [b64(IMAGES[0])]}])
    assert reply.status_code == 200, reply.text
    assert N_CTX // 2 < reply.json()["prompt_eval_count"] <= N_CTX - N_CTX // 4  # room left for an answer
    assert reply.json()["message"]["content"]


def test_ollama_refuses_what_cannot_fit_even_cut(server):
    too_many_images = [{"role": "user", "content": "hi", "images": [b64(IMAGES[0])] * 4}]
    assert chat(server, too_many_images, options={"temperature": 0}).status_code == 200  # 4 × 64 fits
    reply = httpx.post(f"{server.url}/api/generate", timeout=120,
                       json={"prompt": "shape " * 600, "stream": False})
    assert reply.status_code == 400 and "the context holds 512" in reply.json()["error"]  # nothing to drop
