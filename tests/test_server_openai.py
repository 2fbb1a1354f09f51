"""The official `openai` client against a real `llava-edge serve` (demo bundle, 4 slots): answers equal
`llava-edge chat --prompt`, whatever the order of the parts, streamed or not, alone or 8 at once."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from llava_edge.paths import DEMO_BUNDLE
from server_process import EXAMPLES, SUFFIX, chat_cli_answer, image_part

TRIANGLE = EXAMPLES / "green_triangle.png"
COLOR_Q = "What color is the triangle?" + SUFFIX


SERVE_ARGS = ("--parallel", "4")


@pytest.fixture(scope="module")
def client(openai_client):
    return openai_client


def ask(client, parts: list[dict], **kw):
    return client.chat.completions.create(model="llava-edge-demo", messages=[{"role": "user", "content": parts}],
                                          temperature=0, **kw)


def n_image_tokens() -> int:
    return json.loads((DEMO_BUNDLE / "manifest.json").read_text())["vision"]["n_image_tokens"]


def test_parts_in_either_order_give_the_chat_answer(client):
    expected = chat_cli_answer(TRIANGLE, COLOR_Q)
    text_first = ask(client, [{"type": "text", "text": COLOR_Q}, image_part(TRIANGLE)])
    image_first = ask(client, [image_part(TRIANGLE), {"type": "text", "text": COLOR_Q}])
    assert text_first.choices[0].message.content == expected
    assert image_first.choices[0].message.content == expected
    choice, usage = text_first.choices[0], text_first.usage
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    assert usage.prompt_tokens > n_image_tokens()  # image positions are counted
    assert usage.completion_tokens >= 1 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streamed_answer_equals_the_chat_answer_with_usage_last(client):
    image = EXAMPLES / "red_circle_blue_triangle.png"
    expected = chat_cli_answer(image, "Describe the image.")
    chunks = list(ask(client, [{"type": "text", "text": "Describe the image."}, image_part(image)], stream=True,
                      stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 3
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)


def test_max_tokens_and_stop(client):
    image = EXAMPLES / "red_circle_blue_triangle.png"
    full = ask(client, [image_part(image), {"type": "text", "text": "Describe the image."}]).choices[0].message.content
    short = ask(client, [image_part(image), {"type": "text", "text": "Describe the image."}], max_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2
    assert full.startswith(short.choices[0].message.content)
    word = full.split()[2]  # "A red circle and ...": cut before the third word
    stopped = ask(client, [image_part(image), {"type": "text", "text": "Describe the image."}], stop=[word])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == full[: full.index(word)].strip()


def test_eight_concurrent_clients_answer_as_serial_ones(client):
    questions = ["Describe the image.", "How many shapes are there?" + SUFFIX]
    jobs = [(image, q) for image in sorted(EXAMPLES.glob("*.png")) for q in questions]
    assert len(jobs) == 8

    def one(job):
        image, q = job
        return ask(client, [{"type": "text", "text": q}, image_part(image)], max_tokens=48).choices[0].message.content

    serial = [one(job) for job in jobs]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(one, jobs))
    assert concurrent == serial
    assert serial[0] == chat_cli_answer(*jobs[0])


def test_second_turn_resent_in_full_reuses_the_image(client):
    first_q, second_q = "How many shapes are there?" + SUFFIX, "Describe the image."
    image = EXAMPLES / "yellow_triangle_red_circle_blue_square.png"
    messages = [{"role": "user", "content": [{"type": "text", "text": first_q}, image_part(image)]}]
    first = client.chat.completions.create(model="m", messages=messages, temperature=0)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": second_q}]
    second = client.chat.completions.create(model="m", messages=messages, temperature=0)
    assert second.usage.prompt_tokens_details.cached_tokens >= n_image_tokens()
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    assert second.choices[0].message.content


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["llava-edge-demo"]
