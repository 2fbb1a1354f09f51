"""Bad input never takes `llava-edge serve` down: each case gets its status and its API's error shape
(OpenAI {"error": {message, type, param, code}}, Ollama {"error": "..."}), and /health answers afterwards."""

from __future__ import annotations

import base64
import json
import socket
from urllib.parse import urlsplit

import httpx
import pytest

from server_process import EXAMPLES, ServerProcess, image_part
from test_image import png_header_only

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
TRIANGLE = EXAMPLES / "green_triangle.png"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    (root / "media").mkdir()
    (root / "media" / "triangle.png").write_bytes(TRIANGLE.read_bytes())
    (root / "secret.png").write_bytes(TRIANGLE.read_bytes())
    (root / "media" / "link.png").symlink_to(root / "secret.png")  # inside by name, outside once resolved
    return root


def SERVE_ARGS(request) -> tuple[str, ...]:
    return ("--api-key", KEY, "--media-dir", str(request.getfixturevalue("media") / "media"), "--max-images", "2")


def user(*parts) -> dict:
    return {"messages": [{"role": "user", "content": list(parts)}], "temperature": 0, "max_tokens": 8}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def url_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


BOMB = png_header_only(20000, 20000)  # 400 M pixels declared, a few bytes sent
CHAT = "/v1/chat/completions"

# (case, path, body (dict: JSON; bytes: raw), headers, status, OpenAI error code or None)
CASES = [
    ("malformed json", CHAT, b'{"messages": [', AUTH, 400, "invalid_json"),
    ("wrong schema", CHAT, {"messages": "hello"}, AUTH, 422, "invalid_schema"),
    ("no messages", CHAT, {"messages": []}, AUTH, 422, "invalid_schema"),
    ("unknown role", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, AUTH, 400, "invalid_role"),
    ("bad base64", CHAT, user(text("hi"), url_part("data:image/png;base64,@@not-base64@@")), AUTH, 400, "invalid_image"),
    ("not an image", CHAT, user(text("hi"), url_part("data:image/png;base64," + b64(b"hello world"))), AUTH, 400, None),
    ("decompression bomb", CHAT, user(text("hi"), url_part("data:image/png;base64," + b64(BOMB))), AUTH, 400, None),
    ("too many images", CHAT, user(text("hi"), *[image_part(TRIANGLE)] * 3), AUTH, 400, "too_many_images"),
    ("prompt past the context", CHAT, user(text("shape " * 3000)), AUTH, 400, "context_length_exceeded"),
    ("n > 1", CHAT, {**user(text("hi")), "n": 2}, AUTH, 400, "unsupported_n"),
    ("a call of a tool not offered", CHAT, {**user(text("hi")), "tools": [{"type": "function", "function": {"name": "f"}}],
                                            "tool_choice": {"type": "function", "function": {"name": "g"}}}, AUTH,
     400, "unsupported_tool_choice"),
    ("image in an assistant message", CHAT, {"messages": [{"role": "assistant", "content": [image_part(TRIANGLE)]}]},
     AUTH, 400, "invalid_image"),
    ("remote image without --allow-remote-images", CHAT, user(url_part("http://127.0.0.1:9/x.png")), AUTH, 403,
     "remote_images_forbidden"),
    ("missing api key", CHAT, user(text("hi")), {}, 401, "missing_api_key"),
    ("wrong api key", "/v1/models", None, {"Authorization": "Bearer nope"}, 401, "invalid_api_key"),
    ("unknown endpoint", "/v1/embeddings", {"input": "x"}, AUTH, 404, None),
    ("ollama malformed json", "/api/chat", b"{", AUTH, 400, None),
    ("ollama bad base64", "/api/chat", {"messages": [{"role": "user", "content": "hi", "images": ["%%%"]}]}, AUTH, 400,
     None),
    ("ollama not an image", "/api/generate", {"prompt": "hi", "images": [b64(b"GIF89a junk")]}, AUTH, 400, None),
    ("ollama unknown role", "/api/chat", {"messages": [{"role": "tool", "content": "hi"}]}, AUTH, 400, None),
    ("ollama missing api key", "/api/tags", None, {}, 401, None),
]


@pytest.mark.parametrize("case, path, body, headers, status, code", CASES, ids=[c[0] for c in CASES])
def test_bad_request(server, case, path, body, headers, status, code):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
    method = "POST" if body is not None else "GET"
    r = httpx.request(method, server.url + path, headers=headers, timeout=60, **kw)
    assert r.status_code == status, r.text
    assert_error_shape(path, r.json(), code)
    assert server.health() == 200


def assert_error_shape(path: str, body: dict, code: str | None) -> None:
    if path.startswith("/api/"):
        assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
        return
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"]
    if code is not None:
        assert err["code"] == code


def test_body_over_the_limit_is_413(server):
    # The declared length alone is refused, before any of the body is read.
    host, port = urlsplit(server.url).hostname, urlsplit(server.url).port
    with socket.create_connection((host, port), timeout=30) as s:
        s.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                  "Content-Type: application/json\r\nContent-Length: 400000000\r\n\r\n".encode())
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < content_length(reply):
            chunk = s.recv(65536)  # the head and the body may come in separate reads
            if not chunk:
                break
            reply += chunk
    head, body = reply.decode().split("\r\n\r\n", 1)
    assert head.startswith("HTTP/1.1 413")
    assert json.loads(body)["error"]["code"] == "body_too_large"
    assert server.health() == 200


def content_length(reply: bytes) -> int:
    for line in reply.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def test_file_url_outside_the_media_dir_is_403(server, media):
    for outside in (media / "secret.png", media / "media" / "link.png", media / "media" / ".." / "secret.png"):
        r = httpx.post(server.url + CHAT, headers=AUTH, json=user(text("hi"), url_part(outside.as_uri())), timeout=60)
        assert r.status_code == 403, (outside, r.text)
        assert_error_shape(CHAT, r.json(), "media_dir_forbidden")
    inside = httpx.post(server.url + CHAT, headers=AUTH, timeout=60,
                        json=user(text("What color is the triangle?"), url_part((media / "media" / "triangle.png").as_uri())))
    assert inside.status_code == 200 and inside.json()["choices"][0]["message"]["content"]
    assert server.health() == 200


def test_health_needs_no_key_and_the_server_still_answers(server):
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"
    r = httpx.post(server.url + CHAT, headers=AUTH, json=user(image_part(TRIANGLE), text("Describe the image.")),
                   timeout=60)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    metrics = httpx.get(server.url + "/metrics", headers=AUTH, timeout=10).text
    assert 'llava_edge_requests_total{endpoint="/v1/chat/completions",status="400"}' in metrics
    assert "llava_edge_busy_slots" in metrics and "llava_edge_ttft_seconds_bucket" in metrics
