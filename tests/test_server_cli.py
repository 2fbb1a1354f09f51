"""`llava-edge serve` refuses bad settings before it loads anything: one line, exit 2."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("args, words", [
    (["--threads", "0"], "--threads"),
    (["--n-ctx", "10"], "--n-ctx 10"),
    (["--parallel", "0"], "parallel"),
    (["--queue", "-1"], "queue"),
    (["--bundle", "/nonexistent-bundle"], "/nonexistent-bundle"),
])
def test_bad_serve_settings_are_one_line(args, words):
    proc = subprocess.run([sys.executable, "-m", "llava_edge.cli", "serve", "--port", "0", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llava-edge: error:") and words in lines[0], proc.stderr
