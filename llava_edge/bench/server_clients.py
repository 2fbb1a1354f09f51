"""The server case's clients: new images, one streamed OpenAI (or Ollama) request timed from send to its first
token and its end, a level of concurrent clients, and the second turn of a conversation re-sent in full."""

from __future__ import annotations

import base64
import io
import json
import statistics
import threading
import time
from dataclasses import dataclass

import httpx
import numpy as np
from PIL import Image

from ..paths import CALIBRATION_DIR
from .server_procs import Server, ServerCaseConfig

QUESTION = "Describe the image in detail."
FOLLOW_UP = "What else is in the picture?"


class Images:
    """Request k gets the photo k % 4 with one pixel changed: new bytes (a cache miss), the same compute."""

    def __init__(self):
        self.photos = [Image.open(p).convert("RGB") for p in sorted(CALIBRATION_DIR.glob("*.jpg"))]
        self.k = 0

    def next_png(self) -> bytes:
        img = self.photos[self.k % len(self.photos)].copy()
        img.putpixel((self.k // len(self.photos), 0), (self.k % 256, 17, 91))
        self.k += 1
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    def next_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.next_png()).decode()


@dataclass
class Timed:
    t_send: float
    t_first: float = 0.0
    t_end: float = 0.0
    n_tokens: int = 0
    text: str = ""
    error: str | None = None


def openai_request(url: str, messages: list, max_tokens: int, eos_id: int) -> Timed:
    body = {"model": "m", "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "logit_bias": {str(eos_id): -100}}
    t = Timed(time.perf_counter())
    pieces, reported = [], None
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as r:
            if r.status_code != 200:
                t.error = f"{r.status_code}: {r.read()[:200]!r}"
                return t
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("timings", {}).get("n_generated"):  # llava-edge's own account of its first token
                    reported = t.t_send + chunk["timings"]["ttft_ms"] / 1000
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if "content" in delta and "role" not in delta:  # a token, even one with no text
                        t.t_first = t.t_first or time.perf_counter()
                        pieces.append(delta["content"] or "")
    except httpx.HTTPError as e:
        t.error = repr(e)
    t.t_end = time.perf_counter()
    t.n_tokens, t.text = max_tokens, "".join(pieces)  # EOS banned: every answer runs to max_tokens
    t.t_first = reported or t.t_first
    return t


def ollama_request(url: str, messages: list, max_tokens: int) -> Timed:
    body = {"model": "m", "messages": messages, "stream": True, "options": {"temperature": 0, "num_predict": max_tokens}}
    t = Timed(time.perf_counter())
    with httpx.stream("POST", f"{url}/api/chat", json=body, timeout=600) as r:
        for line in r.iter_lines():
            part = json.loads(line) if line else {}
            if part.get("message", {}).get("content"):
                t.t_first = t.t_first or time.perf_counter()
                t.text += part["message"]["content"]
            if part.get("done"):
                t.n_tokens = part.get("eval_count", 0)
                t.t_first = t.t_send + part["prompt_eval_duration"] / 1e9  # the first token, as the server saw it
    t.t_end = time.perf_counter()
    return t


def image_question(uri: str, text: str = QUESTION) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": uri}}]}


def concurrent_level(server: Server, clients: int, images: Images, cfg: ServerCaseConfig, eos_id: int) -> dict:
    uris = [images.next_uri() for _ in range(clients)]
    results: list[Timed | None] = [None] * clients

    def client(i: int) -> None:
        results[i] = openai_request(server.url, [image_question(uris[i])], cfg.n_decode, eos_id)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    errors = [r.error for r in results if r.error or not r.t_first]
    if errors:
        raise RuntimeError(f"{server.name}, {clients} clients: {errors[:2]}")
    ttft = [1000 * (r.t_first - r.t_send) for r in results]
    windows = sorted((r.t_first, r.t_end) for r in results)
    latency = sorted(r.t_end - r.t_send for r in results)  # when each answer ended, from its request
    return {"server": server.name, "clients": clients, "wall_s": wall, "latency_s": latency,
            "mean_latency_s": statistics.mean(latency), "ttft_ms_p50": statistics.median(ttft),
            "ttft_ms_p90": float(np.percentile(ttft, 90)), "ttft_ms": ttft,
            "decode_tokens_per_s": sum(r.n_tokens - 1 for r in results) / _union_length(windows),
            "rss_mb": server.rss_mb()}


def _union_length(windows: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in windows:
        if b > end:
            total += b - max(a, end)
            end = b
    return max(total, 1e-9)


def second_turn(server: Server, images: Images, cfg: ServerCaseConfig, eos_id: int, api: str) -> dict:
    """Turn 1 (image + question, n_decode tokens), then the whole conversation again with a follow-up: its TTFT."""
    uri = images.next_uri()
    first = openai_request(server.url, [image_question(uri)], cfg.n_decode, eos_id)
    history = [image_question(uri), {"role": "assistant", "content": first.text}, {"role": "user", "content": FOLLOW_UP}]
    if api == "ollama":
        b64 = uri.split(",", 1)[1]
        history = [{"role": "user", "content": QUESTION, "images": [b64]},
                   {"role": "assistant", "content": first.text}, {"role": "user", "content": FOLLOW_UP}]
        second = ollama_request(server.url, history, 8)
    else:
        second = openai_request(server.url, history, 8, eos_id)
    return {"server": server.name, "api": api, "first_ttft_ms": 1000 * (first.t_first - first.t_send),
            "second_ttft_ms": 1000 * (second.t_first - second.t_send)}
