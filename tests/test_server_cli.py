"""`llava-edge serve` refuses bad settings before it loads anything: one line, exit 2."""

import subprocess
import sys

import httpx
import pytest
from server_process import ServerProcess


@pytest.mark.parametrize("args, words", [
    (["--threads", "0"], "--threads"),
    (["--n-ctx", "10"], "--n-ctx 10"),
    (["--parallel", "0"], "parallel"),
    (["--queue", "-1"], "queue"),
    (["--bundle", "/nonexistent-bundle"], "/nonexistent-bundle"),
    (["--temperature", "-1"], "--temperature"),
    (["--top-p", "0"], "--top-p"),
])
def test_bad_serve_settings_are_one_line(args, words):
    proc = subprocess.run([sys.executable, "-m", "llava_edge.cli", "serve", "--port", "0", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llava-edge: error:") and words in lines[0], proc.stderr


def test_serving_the_demo_says_so_once_on_stderr():
    server = ServerProcess()
    try:
        notes = [line for line in server.stderr().splitlines() if "demo model" in line]
        assert len(notes) == 1 and "synthetic world" in notes[0]
    finally:
        server.stop()


def test_quiet_writes_no_line_per_request():
    server = ServerProcess("--quiet")
    try:
        assert httpx.get(f"{server.url}/v1/models", timeout=30).status_code == 200
        assert httpx.post(f"{server.url}/v1/chat/completions", json={}, timeout=30).status_code == 422
    finally:
        assert server.stop() == 0
    assert "llava-edge serve: stopped" in server.stderr()
    assert not [line for line in server.stderr().splitlines() if "/v1/" in line], server.stderr()
