"""The two servers of the server case as processes (`llava-edge serve`; llama-cpp-python's own server with the
LLaVA-1.5 handler), and a busy neighbour: one process spinning on one core, as a test suite or a browser would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from ..runtime.bundle import open_bundle


@dataclass
class ServerCaseConfig:
    bundle: Path
    threads: int
    n_decode: int = 128
    levels: tuple[int, ...] = (1, 2, 4)
    n_ctx: int = 2048  # positions per sequence, in both servers
    out: Path | None = None
    busy_neighbour: bool = False  # the levels again with one busy process pinned to one core
    neighbour_core: int = 0


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


def start_llava_edge(cfg: ServerCaseConfig, parallel: int, source: Path | None = None,
                     name: str = "llava-edge") -> Server:
    """`llava-edge serve` from this checkout, or from `source` (another checkout's root, put first on the path)."""
    port = _free_port()
    log = tempfile.TemporaryFile(mode="w+")
    cmd = [sys.executable, "-m", "llava_edge.cli", "serve", "--bundle", str(Path(cfg.bundle).resolve()),
           "--port", str(port), "--parallel", str(parallel), "--threads", str(cfg.threads), "--n-ctx", str(cfg.n_ctx)]
    env = None if source is None else {**os.environ, "PYTHONPATH": str(source)}
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, cwd=source)
    return _wait_ready(Server(name, proc, f"http://127.0.0.1:{port}", log))


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


@contextmanager
def busy_neighbour(core: int):
    """A process that spins on `core` (pinned there with sched_setaffinity) until the block ends."""
    if core not in os.sched_getaffinity(0):
        raise SystemExit(f"core {core} is not one this process may run on: {sorted(os.sched_getaffinity(0))}")
    code = f"import os\nos.sched_setaffinity(0, {{{core}}})\nwhile True:\n    pass\n"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        yield proc
    finally:
        proc.terminate()
        proc.wait()

