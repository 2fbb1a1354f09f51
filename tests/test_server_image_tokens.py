"""Fewer image tokens per request through both APIs, with the real `openai` and `ollama` clients against a real
`llava-edge serve`: the answer `chat --image-tokens K` gives, the prompt shorter by the tokens left out, the KV of
an image at one budget never reused at another, and a bad budget a 400 that leaves the server serving."""

from __future__ import annotations

import base64

import ollama
import openai
import pytest

from server_process import EXAMPLES, image_part

SERVE_ARGS = ("--parallel", "2")
IMAGE = EXAMPLES / "yellow_triangle_red_circle_blue_square.png"
QUESTION = "Describe the image."


def ask_openai(client, **extra):
    return client.chat.completions.create(
        model="llava-edge-demo", temperature=0, extra_body=extra,
        messages=[{"role": "user", "content": [image_part(IMAGE), {"type": "text", "text": QUESTION}]}])


def ask_ollama(client, **options):
    return client.chat(model="llava-edge-demo", stream=False, options={"temperature": 0, **options}, messages=[
        {"role": "user", "content": QUESTION, "images": [base64.b64encode(IMAGE.read_bytes()).decode()]}])


@pytest.mark.parametrize("k", [32, 16])
def test_openai_image_tokens_answers_as_the_chat_flag(openai_client, k):
    from server_process import chat_cli_answer

    full = ask_openai(openai_client)
    reduced = ask_openai(openai_client, image_tokens=k)
    assert reduced.choices[0].message.content == chat_cli_answer(IMAGE, QUESTION, "--image-tokens", str(k))
    assert full.usage.prompt_tokens - reduced.usage.prompt_tokens == 64 - k


def test_ollama_options_image_tokens(ollama_client):
    from server_process import chat_cli_answer

    full, reduced = ask_ollama(ollama_client), ask_ollama(ollama_client, image_tokens=32)
    assert reduced.message.content == chat_cli_answer(IMAGE, QUESTION, "--image-tokens", "32")
    assert full.prompt_eval_count - reduced.prompt_eval_count == 32


def test_an_image_at_another_budget_is_not_taken_from_the_kv(openai_client):
    ask_openai(openai_client, image_tokens=48)
    again = ask_openai(openai_client, image_tokens=48)
    other = ask_openai(openai_client, image_tokens=40)
    cached = lambda r: r.usage.prompt_tokens_details.cached_tokens  # noqa: E731
    assert cached(again) >= 48  # the same image at the same budget: its positions come from the KV
    assert cached(other) < 40  # at another budget: only the text before the image is shared


def test_every_token_by_number_is_the_default(openai_client):
    every, default = ask_openai(openai_client, image_tokens=64), ask_openai(openai_client)
    assert every.choices[0].message.content == default.choices[0].message.content
    assert every.usage.prompt_tokens == default.usage.prompt_tokens
    assert default.usage.prompt_tokens_details.cached_tokens >= 64  # the same image: K = 64 is the default's entry


@pytest.mark.parametrize("bad", [65, 0, -3, "many", 2.5])
def test_a_bad_budget_is_a_400_in_both_apis(openai_client, ollama_client, bad):
    with pytest.raises(openai.BadRequestError, match="image tokens"):
        ask_openai(openai_client, image_tokens=bad)
    with pytest.raises(ollama.ResponseError, match="image tokens") as e:
        ask_ollama(ollama_client, image_tokens=bad)
    assert e.value.status_code == 400
    assert ask_openai(openai_client).choices[0].message.content  # still serving
