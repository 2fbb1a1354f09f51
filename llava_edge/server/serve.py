"""`llava-edge serve`: open the engine, bind, print the URL, serve until SIGINT/SIGTERM, close cleanly."""

from __future__ import annotations

import os
import signal
import sys
import threading

import uvicorn

from ..errors import UserError
from ..runtime import Engine, EngineConfig, Model
from .app import create_app
from .server_config import ServerConfig


class _Server(uvicorn.Server):
    """uvicorn, but a signal ends the process with exit code 0 (uvicorn re-raises it after shutdown), answers
    still running after the grace period are cut, and the bound URL is printed once listening."""

    def __init__(self, config: uvicorn.Config, app, cfg: ServerConfig):
        super().__init__(config)
        self.llava_app, self.cfg = app, cfg

    def handle_exit(self, sig, frame) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True
        timer = threading.Timer(self.cfg.shutdown_grace_s, self.cut_answers)
        timer.daemon = True
        timer.start()

    def cut_answers(self) -> None:
        for running in list(self.llava_app.state.active):
            running.gen.cancel()  # thread-safe; the stream then ends with finish_reason "length"

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            host = f"[{host}]" if ":" in host else host
            print(f"llava-edge serve: {self.cfg.model_name} on http://{host}:{port}", flush=True)


def serve(model: Model, engine_cfg: EngineConfig, cfg: ServerConfig, note: str | None = None) -> None:
    """Serve the model until a signal; the model is the caller's (it stays open). `note` goes to stderr once the
    engine is up (the settings are checked by then)."""
    if cfg.max_images < 1 or engine_cfg.parallel < 1 or engine_cfg.queue < 0 or not 0 <= cfg.port <= 65535:
        raise UserError("--parallel and --max-images must be at least 1, --queue at least 0, --port in 0..65535")
    if cfg.media_dir is not None and not os.path.isdir(cfg.media_dir):
        raise UserError(f"--media-dir {cfg.media_dir}: not a directory")
    engine = Engine(model, engine_cfg)
    if note:
        print(note, file=sys.stderr)
    try:
        engine.start()
        app = create_app(engine, cfg)
        # uvicorn's own access log stays off: the Gate writes the one line per request (request_log.py)
        config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False,
                                timeout_graceful_shutdown=cfg.shutdown_grace_s + 2, lifespan="on")
        server = _Server(config, app, cfg)
        try:
            server.run()
        except SystemExit:  # uvicorn exits when it cannot bind
            server.started = False
        if not server.started:
            raise UserError(f"could not listen on {cfg.host}:{cfg.port} (in use, or not an address of this machine)")
    finally:
        engine.close()
    print("llava-edge serve: stopped", file=sys.stderr, flush=True)
