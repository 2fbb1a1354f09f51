"""The server soak: many requests through `llava-edge serve` alone, with bad images and dropped streams among them;
the failures and the server's memory over time."""

from __future__ import annotations

import base64
import threading
import time

import httpx

from ..runtime.bundle import open_bundle
from .server_clients import Images, image_question, openai_request
from .server_procs import ServerCaseConfig, start_llava_edge


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
