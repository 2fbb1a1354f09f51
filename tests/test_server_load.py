"""Load on a real `llava-edge serve` with one slot and a queue of one: a request that finds both taken gets 503
with Retry-After, a client that hangs up mid-stream frees its slot at once, and SIGTERM ends open streams and exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from server_process import EXAMPLES, ServerProcess, image_part

# Answers that cannot end early (EOS banned) and take seconds: long enough to hold the only slot.
LONG = {"messages": [{"role": "user", "content": [image_part(EXAMPLES / "green_triangle.png"),
                                                  {"type": "text", "text": "Describe the image."}]}],
        "temperature": 0, "max_tokens": 3500, "ignore_eos": True, "stream": True}


SERVE_ARGS = ("--parallel", "1", "--queue", "1", "--n-ctx", "4096")


def stats(server) -> dict:
    return httpx.get(f"{server.url}/health", timeout=10).json()


class OpenStream:
    """A streaming request read up to its first answer piece (or its status), then held open."""

    def __init__(self, server, body=LONG):
        self.client = httpx.Client(timeout=60)
        self.response = self.client.send(self.client.build_request("POST", f"{server.url}/v1/chat/completions",
                                                                    json=body), stream=True)
        self.lines = self.response.iter_lines()

    def first_piece(self) -> str:
        for line in self.lines:
            if '"content": "' in line and '"content": ""' not in line:
                return line
        raise AssertionError("the stream ended before any answer")

    def close(self):
        self.response.close()
        self.client.close()


def wait_until(predicate, timeout: float) -> float:
    t0 = time.perf_counter()
    while not predicate():
        assert time.perf_counter() - t0 < timeout, "timed out"
        time.sleep(0.02)
    return time.perf_counter() - t0


def answer_tokens(server) -> float:
    """Answer tokens the engine made, cancelled answers included (/metrics)."""
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return float(next(line.split()[-1] for line in text.splitlines() if line.startswith("llava_edge_answer_tokens_total")))


def test_disconnect_mid_stream_frees_the_slot(server):
    before = answer_tokens(server)
    stream = OpenStream(server)
    stream.first_piece()
    assert stats(server)["busy"] == 1
    stream.close()
    # hanging up frees the slot within an engine step: the answer stops far short of the context's end
    assert wait_until(lambda: stats(server)["busy"] == 0, timeout=2.0) < 2.0
    assert answer_tokens(server) - before < 200  # the whole answer would fill the context: about 400 tokens


def test_queue_overflow_gives_503_with_retry_after(server):
    """Eight requests at once on one slot and a queue of one: those that find both taken get 503 with Retry-After,
    and every request taken runs to its end. (The demo's context holds one answer for well under a second, so
    the requests arrive together, released by a barrier, rather than while a held stream runs.)"""
    n = 8
    barrier, results = threading.Barrier(n), [None] * n

    def ask(i: int) -> None:
        barrier.wait()
        results[i] = httpx.post(f"{server.url}/v1/chat/completions", json={**LONG, "stream": False}, timeout=120)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    refused = [r for r in results if r.status_code == 503]
    served = [r for r in results if r.status_code == 200]
    assert len(refused) + len(served) == n, [r.status_code for r in results]
    assert refused and len(served) >= 2, "the slot and the queue were never both taken"
    for r in refused:
        assert r.headers["retry-after"].isdigit() and r.json()["error"]["code"] == "server_busy"
    for r in served:
        assert r.json()["choices"][0]["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] > 100
    wait_until(lambda: stats(server)["busy"] == 0 and stats(server)["queued"] == 0, timeout=5)


def test_sigterm_ends_open_streams_and_exits_0():
    s = ServerProcess("--parallel", "1", "--n-ctx", "4096")
    stream = OpenStream(s, {**LONG, "stream_options": {"include_usage": True}})
    stream.first_piece()
    t0 = time.perf_counter()
    s.proc.send_signal(signal.SIGTERM)
    rest = [line for line in stream.lines if line]  # the stream ends (cut after the grace period), no hang
    assert rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in rest[-3]
    assert json.loads(rest[-2][len("data: "):])["usage"]["completion_tokens"] < LONG["max_tokens"]  # cut short
    assert s.stop(timeout=30) == 0, s.stderr()
    assert time.perf_counter() - t0 < 20
    stream.close()
