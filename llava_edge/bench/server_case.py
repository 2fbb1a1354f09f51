"""Server case: `llava-edge serve` against llama-cpp-python's own server (`python -m llama_cpp.server`,
chat_format llava-1-5, the bundle's mmproj as clip_model_path) on the same GGUF, both over the OpenAI API.

At 1, 2 and 4 concurrent clients, each with its own image (a new one per request, so no server finds it in a
cache), every answer exactly `n_decode` tokens (EOS banned with logit_bias): wall time, aggregate decode
tokens/s (answer tokens after each first one, per second of time in which at least one answer was decoding),
TTFT p50/p90. The random-weight model's tokens mostly have no text (its GGUF vocab is padded past a tiny
tokenizer), and llava-edge sends no chunk for a token without text, so its first token cannot be seen in the
stream: its TTFT is the one it reports (`timings.ttft_ms`, from the request's arrival in the engine: the HTTP body
and base64 decode, a few ms, are left out). llama-cpp-python's server sends a chunk per token, text or not, and
its TTFT is the client's time to the first.
Then the second turn of a conversation re-sent in full: its TTFT through llava-edge's OpenAI and Ollama APIs and
through llama-cpp-python's server. The two servers run side by side and are measured in turns (interleaved),
level by level.

    python -m llava_edge.bench.server_case [--bundle DIR] [--threads N] [--n-decode 128] [--out bench/reports]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from ..paths import CALIBRATION_DIR, DEMO_BUNDLE
from ..runtime.bundle import open_bundle

SEVEN_B = Path("runs/bench/llava7b-L2/bundle")  # what `llava-edge bench` builds for its llava7b case
QUESTION = "Describe the image in detail."
FOLLOW_UP = "What else is in the picture?"


@dataclass
class ServerCaseConfig:
    bundle: Path
    threads: int
    n_decode: int = 128
    levels: tuple[int, ...] = (1, 2, 4)
    n_ctx: int = 2048  # positions per sequence, in both servers
    out: Path | None = None


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


# ---------------------------------------------------------------------------------------------- servers


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    url: str
    log: object = None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def rss_mb(self) -> float:
        try:
            for line in open(f"/proc/{self.proc.pid}/status"):
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(server: Server, timeout: float = 300) -> Server:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if server.proc.poll() is not None:
            server.log.seek(0)
            raise RuntimeError(f"{server.name} exited: {server.log.read()[-2000:]}")
        try:
            if httpx.get(f"{server.url}/v1/models", timeout=5).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{server.name} did not answer within {timeout} s")


def start_llava_edge(cfg: ServerCaseConfig, parallel: int) -> Server:
    port = _free_port()
    log = tempfile.TemporaryFile(mode="w+")
    cmd = [sys.executable, "-m", "llava_edge.cli", "serve", "--bundle", str(cfg.bundle), "--port", str(port),
           "--parallel", str(parallel), "--threads", str(cfg.threads), "--n-ctx", str(cfg.n_ctx)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    return _wait_ready(Server("llava-edge", proc, f"http://127.0.0.1:{port}", log))


def start_llamacpp(cfg: ServerCaseConfig) -> Server:
    files = open_bundle(cfg.bundle).manifest["files"]
    if "mmproj" not in files:
        raise SystemExit(f"{cfg.bundle} has no mmproj (export it with --mmproj) for llama.cpp's LLaVA path")
    port = _free_port()
    log = tempfile.TemporaryFile(mode="w+")
    cmd = [sys.executable, "-m", "llava_edge.bench.server_case", "llamacpp-server", "--",
           "--model", str(cfg.bundle / files["decoder"]["name"]), "--clip_model_path", str(cfg.bundle / files["mmproj"]["name"]),
           "--chat_format", "llava-1-5", "--n_ctx", str(cfg.n_ctx), "--n_threads", str(cfg.threads),
           "--n_threads_batch", str(cfg.threads), "--host", "127.0.0.1", "--port", str(port), "--verbose", "False",
           "--interrupt_requests", "False"]  # its default cancels the running answer when another request comes
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    return _wait_ready(Server("llama-cpp-python server", proc, f"http://127.0.0.1:{port}", log))


def run_llamacpp_server(argv: list[str]) -> None:
    """llama_cpp.server's main, with llama.cpp's extra CPU buffer types off where they crash on this machine
    (the runtime's probe; GCC-12 AMX builds die on their first batched decode otherwise)."""
    import llama_cpp.llama_cpp as llama_cpp_c
    from llama_cpp.server.__main__ import main

    from ..runtime.llama_probe import extra_bufts_verdict

    safe, defaults = extra_bufts_verdict().extra_bufts, llama_cpp_c.llama_model_default_params

    def model_params():
        params = defaults()
        params.use_extra_bufts = safe
        return params

    llama_cpp_c.llama_model_default_params = model_params
    sys.argv = ["llama_cpp.server", *argv]
    main()


# ---------------------------------------------------------------------------------------------- clients


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


def soak(cfg: ServerCaseConfig, n_requests: int, clients: int = 4) -> dict:
    """n_requests through llava-edge from `clients` threads: 8 images in turn, streamed and not, every 10th a
    bad image (must be a 400), every 10th stream dropped after its first piece. Failures and RSS over time."""
    server = start_llava_edge(cfg, clients)
    eos_id = open_bundle(cfg.bundle).eos_id
    images = Images()
    uris = [images.next_uri() for _ in range(8)]
    failures, rss, done, lock = [], [server.rss_mb()], [0], threading.Lock()

    def one(k: int) -> None:
        if k % 10 == 3:
            r = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={"messages": [image_question(
                "data:image/png;base64," + base64.b64encode(b"not an image").decode())]})
            ok = r.status_code == 400
        elif k % 10 == 7:
            with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=120, json={
                    "messages": [image_question(uris[k % 8])], "max_tokens": cfg.n_decode, "stream": True}) as r:
                ok = r.status_code == 200 and any('"content": "' in line for line in r.iter_lines())
        else:
            t = openai_request(server.url, [image_question(uris[k % 8])], cfg.n_decode, eos_id)
            ok = t.error is None and bool(t.text)
        with lock:
            done[0] += 1
            if not ok:
                failures.append(k)
            if done[0] % 50 == 0:
                rss.append(server.rss_mb())

    t0 = time.perf_counter()
    try:
        counter = iter(range(n_requests))
        lock_iter = threading.Lock()

        def worker() -> None:
            while True:
                with lock_iter:
                    k = next(counter, None)
                if k is None:
                    return
                one(k)

        threads = [threading.Thread(target=worker) for _ in range(clients)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        healthy = httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    finally:
        server.stop()
    return {"bundle": str(cfg.bundle), "requests": n_requests, "clients": clients, "failures": len(failures),
            "failed": failures[:20], "healthy_after": healthy, "rss_mb_every_50": [round(x, 1) for x in rss],
            "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------- the case


def run_server_case(cfg: ServerCaseConfig) -> dict:
    eos_id = open_bundle(cfg.bundle).eos_id
    images = Images()
    t_start = time.perf_counter()
    edge = start_llava_edge(cfg, max(cfg.levels))
    try:
        baseline = start_llamacpp(cfg)
    except BaseException:
        edge.stop()
        raise
    rows, turns = [], []
    try:
        for server in (edge, baseline):  # warm-up: first decode, first image encode
            openai_request(server.url, [image_question(images.next_uri())], 4, eos_id)
        for clients in cfg.levels:
            for server in (edge, baseline):
                rows.append(concurrent_level(server, clients, images, cfg, eos_id))
                print(_row_line(rows[-1]), flush=True)
        for server, api in ((edge, "openai"), (baseline, "openai"), (edge, "ollama")):
            turns.append(second_turn(server, images, cfg, eos_id, api))
            print(turns[-1], flush=True)
    finally:
        edge.stop()
        baseline.stop()
    report = {"bundle": str(cfg.bundle), "threads": cfg.threads, "n_decode": cfg.n_decode, "n_ctx": cfg.n_ctx,
              "cpu": _cpu(), "cores": os.cpu_count(), "rows": rows, "second_turn": turns,
              "ratios": _ratios(rows, turns, max(cfg.levels)), "seconds": time.perf_counter() - t_start}
    if cfg.out is not None:
        cfg.out.mkdir(parents=True, exist_ok=True)
        (cfg.out / "server_case.json").write_text(json.dumps(report, indent=2) + "\n")
        (cfg.out / "server_case.md").write_text(markdown(report))
    return report


def _ratios(rows: list[dict], turns: list[dict], top: int) -> dict:
    def row(server: str, clients: int) -> dict:
        return next(r for r in rows if r["server"] == server and r["clients"] == clients)

    edge, base = "llava-edge", "llama-cpp-python server"
    turn = {(t["server"], t["api"]): t["second_ttft_ms"] for t in turns}
    return {f"wall_{top}_clients_vs_llamacpp_server": row(edge, top)["wall_s"] / row(base, top)["wall_s"],
            f"mean_latency_{top}_clients_vs_llamacpp_server":
                row(edge, top)["mean_latency_s"] / row(base, top)["mean_latency_s"],
            **({f"decode_{top}_clients_vs_own_1_client": row(edge, top)["decode_tokens_per_s"] / row(edge, 1)[
                "decode_tokens_per_s"]} if any(r["clients"] == 1 for r in rows) else {}),
            "second_turn_ttft_vs_llamacpp_server": turn[(edge, "openai")] / turn[(base, "openai")],
            "second_turn_ttft_ollama_api_vs_llamacpp_server": turn[(edge, "ollama")] / turn[(base, "openai")]}


def _cpu() -> str:
    from .device import cpu_model

    return cpu_model()


def _row_line(r: dict) -> str:
    return (f"{r['server']:>24} {r['clients']} clients: wall {r['wall_s']:.2f} s, decode {r['decode_tokens_per_s']:.1f} "
            f"tok/s, TTFT p50 {r['ttft_ms_p50']:.0f} ms p90 {r['ttft_ms_p90']:.0f} ms")


def markdown(report: dict) -> str:
    lines = [f"# Server case: {report['bundle']}", "",
             f"{report['cpu']}, {report['cores']} cores, {report['threads']} threads; {report['n_decode']} tokens per "
             f"answer (EOS banned), one new image per request; the two servers measured in turns.", "",
             "| server | clients | wall | answers ended (s) | mean latency | aggregate decode | TTFT p50 | TTFT p90 | RSS |",
             "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        ended = ", ".join(f"{x:.0f}" for x in r["latency_s"])
        lines.append(f"| {r['server']} | {r['clients']} | {r['wall_s']:.2f} s | {ended} | {r['mean_latency_s']:.1f} s | "
                     f"{r['decode_tokens_per_s']:.1f} tok/s | "
                     f"{r['ttft_ms_p50']:.0f} ms | {r['ttft_ms_p90']:.0f} ms | {r['rss_mb']:.0f} MB |")
    lines += ["", "| second turn re-sent in full | API | 1st-turn TTFT | 2nd-turn TTFT |", "|---|---|---:|---:|"]
    for t in report["second_turn"]:
        lines.append(f"| {t['server']} | {t['api']} | {t['first_ttft_ms']:.0f} ms | {t['second_ttft_ms']:.0f} ms |")
    lines += ["", "| ratio | measured |", "|---|---:|"] + [f"| {k} | {v:.3f} |" for k, v in report["ratios"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["llamacpp-server"]:
        return run_llamacpp_server(argv[2:] if argv[1:2] == ["--"] else argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=SEVEN_B if (SEVEN_B / "manifest.json").exists() else DEMO_BUNDLE)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--n-decode", type=int, default=128)
    p.add_argument("--levels", default="1,2,4")
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--out", type=Path, default=Path("bench/reports"))
    p.add_argument("--soak", type=int, default=0, help="instead: N requests through llava-edge alone (failures, RSS)")
    a = p.parse_args(argv)
    if a.soak:
        result = soak(ServerCaseConfig(a.bundle, a.threads, a.n_decode, n_ctx=a.n_ctx), a.soak)
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "server_soak.json").write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return None
    report = run_server_case(ServerCaseConfig(a.bundle, a.threads, a.n_decode, tuple(int(x) for x in a.levels.split(",")),
                                              a.n_ctx, a.out))
    print(markdown(report))


if __name__ == "__main__":
    main()
