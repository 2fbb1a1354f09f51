"""A loopback HTTP proxy in front of `llava-edge serve` that writes down what a client sends (stdlib only).

Each request is forwarded as it came; the answer streams back as the server sends it (SSE and NDJSON
included), closed when it ends. Every exchange is kept as {"method", "path", "status", "body"} (the JSON body,
parsed) in `Recorder.exchanges`, and, given a folder, as NNN.json in it. Used by openwebui_browser.py to see
Open WebUI's real request bodies.
"""

from __future__ import annotations

import http.client
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection",
              "content-length", "host"}


class Recorder:
    def __init__(self, upstream: str, folder: Path | None = None):
        parts = urlsplit(upstream)
        self.host, self.port = parts.hostname, parts.port
        self.folder, self.exchanges, self.lock = folder, [], threading.Lock()
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def keep(self, exchange: dict) -> None:
        with self.lock:
            self.exchanges.append(exchange)
            n = len(self.exchanges)
        if self.folder is not None:
            (self.folder / f"{n:03d}.json").write_text(json.dumps(exchange, indent=1))


def handler_for(recorder: Recorder):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one exchange per connection: the body ends when the connection closes

        def log_message(self, *args) -> None:
            pass

        def forward(self) -> None:
            size = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(size) if size else b""
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            upstream = http.client.HTTPConnection(recorder.host, recorder.port, timeout=600)
            upstream.request(self.command, self.path, body=raw or None, headers=headers)
            response = upstream.getresponse()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode("latin-1")
            recorder.keep({"method": self.command, "path": self.path, "status": response.status, "body": body})
            self.send_response(response.status)
            for k, v in response.getheaders():
                if k.lower() not in HOP_BY_HOP:
                    self.send_header(k, v)
            self.end_headers()
            while chunk := response.read1(65536):
                self.wfile.write(chunk)
                self.wfile.flush()
            upstream.close()

        do_GET = do_POST = do_DELETE = do_PUT = forward

    return Handler


def start(upstream: str, folder: Path | None = None) -> tuple[str, Recorder, ThreadingHTTPServer]:
    """Listen on a free loopback port; returns the proxy's URL, the recorder and the server (shutdown() ends it)."""
    recorder = Recorder(upstream, folder)
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(recorder))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", recorder, server
