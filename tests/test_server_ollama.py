"""The official `ollama` client against a real `llava-edge serve`: /api/chat and /api/generate (base64 images,
streamed and not) answer as `llava-edge chat --prompt`; tags, show and version describe the served model."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server_process import EXAMPLES, SUFFIX, chat_cli_answer

IMAGE = EXAMPLES / "red_triangle_yellow_square_yellow_triangle.png"
QUESTION = "What shape is the red object?" + SUFFIX
GREEDY = {"temperature": 0}


SERVE_ARGS = ("--parallel", "2")


@pytest.fixture(scope="module")
def client(ollama_client):
    return ollama_client


@pytest.fixture(scope="module")
def expected():
    return chat_cli_answer(IMAGE, QUESTION)


def test_chat_answers_as_the_cli(client, expected):
    reply = client.chat(model="llava-edge-demo", options=GREEDY, stream=False,
                        messages=[{"role": "user", "content": QUESTION, "images": [str(IMAGE)]}])
    assert reply.message.content == expected and reply.message.role == "assistant"
    assert reply.done and reply.done_reason == "stop"
    assert reply.prompt_eval_count > 64 and reply.eval_count >= 1
    assert reply.total_duration >= reply.prompt_eval_duration > 0


def test_chat_streams_ndjson_by_default(client, expected):
    parts = list(client.chat(model="llava-edge-demo", options=GREEDY, stream=True,
                             messages=[{"role": "user", "content": QUESTION, "images": [IMAGE.read_bytes()]}]))
    assert "".join(p.message.content for p in parts) == expected
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].done_reason == "stop" and parts[-1].eval_count >= 1


def test_generate_answers_as_the_cli(client, expected):
    reply = client.generate(model="llava-edge-demo", prompt=QUESTION, images=[str(IMAGE)], options=GREEDY)
    assert reply.response == expected and reply.done
    streamed = list(client.generate(model="llava-edge-demo", prompt=QUESTION, images=[str(IMAGE)], options=GREEDY,
                                    stream=True))
    assert "".join(p.response for p in streamed) == expected and streamed[-1].done


def test_num_predict_limits_the_answer(client):
    reply = client.generate(model="llava-edge-demo", prompt="Describe the image.", images=[str(IMAGE)],
                            options={"temperature": 0, "num_predict": 2})
    assert reply.done_reason == "length" and reply.eval_count == 2


def test_tags_show_version(client, server):
    models = client.list().models
    assert [m.model for m in models] == ["llava-edge-demo:latest"]
    assert models[0].details.quantization_level == "Q4_K_M" and models[0].size > 0
    shown = client.show("llava-edge-demo")
    assert "vision" in shown.capabilities and shown.modelinfo["llama.embedding_length"] == 256
    assert [m.model for m in client.ps().models] == ["llava-edge-demo:latest"]
    assert httpx.get(f"{server.url}/api/version").json()["version"]


def test_empty_prompt_loads_or_unloads(client):
    assert client.generate(model="llava-edge-demo", prompt="").done_reason == "load"
    assert client.generate(model="llava-edge-demo", prompt="", keep_alive=0).done_reason == "unload"


def test_concurrent_chats_answer_as_serial_ones(client):
    jobs = [(image, q) for image in sorted(EXAMPLES.glob("*.png")) for q in ("Describe the image.", QUESTION)]

    def one(job):
        image, q = job
        return client.chat(model="llava-edge-demo", options=GREEDY,
                           messages=[{"role": "user", "content": q, "images": [str(image)]}]).message.content

    serial = [one(job) for job in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        assert list(pool.map(one, jobs)) == serial
