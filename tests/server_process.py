"""A real `llava-edge serve` process on a free loopback port (it prints the URL it bound), and the answer
`llava-edge chat --prompt` gives, for the server tests to compare against."""

from __future__ import annotations

import base64
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SUFFIX = "\nAnswer the question using a single word or phrase."
# One llama.cpp thread: its workers spin while they wait, and on a shared 2-core machine two of them per process
# made each request 10-30x slower. The oracle runs with the same setting.
THREADS = ("--threads", "1")


class ServerProcess:
    def __init__(self, *args: str, timeout: float = 90.0):
        self.log = tempfile.TemporaryFile(mode="w+")
        cmd = [sys.executable, "-m", "llava_edge.cli", "serve", "--port", "0", *THREADS, *args]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=self.log, text=True)
        first: list[str] = []
        reader = threading.Thread(target=lambda: first.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not first or "http://" not in first[0]:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"llava-edge serve did not start: {first} {self.stderr()}")
        self.url = first[0].split()[-1]

    def stderr(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def health(self) -> int:
        return httpx.get(f"{self.url}/health", timeout=10).status_code

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def chat_cli_answer(image: Path, prompt: str, *options: str) -> str:
    """The oracle: what `llava-edge chat IMAGE --prompt PROMPT [options]` prints (greedy) on the demo bundle."""
    done = subprocess.run([sys.executable, "-m", "llava_edge.cli", "chat", str(image), "--prompt", prompt, *THREADS,
                           *options],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.rstrip("\n")


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def image_part(path: Path) -> dict:
    return {"type": "image_url", "image_url": {"url": data_uri(path)}}
