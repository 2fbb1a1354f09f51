"""`llava-edge caption` run as a user runs it, in a process without torch, and its --out file read back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]
PROMPT = "Describe the image."
# The runtime path must not need torch: it is blocked in every caption process.
NO_TORCH = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
            "from llava_edge.cli import main; main()")


def caption_cmd(*args) -> list[str]:
    return [sys.executable, "-c", NO_TORCH, "caption", *map(str, args), "--threads", "1"]


def caption(*args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(caption_cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


def read_lines(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data.endswith(b"\n"), "the file ends inside a line"
    return [json.loads(line) for line in data.splitlines()]  # every line parses


def assert_each_once(out: Path, folder: Path) -> list[dict]:
    """Every file of `folder` answered in exactly one line."""
    lines = read_lines(out)
    paths = [r["path"] for r in lines]
    assert len(paths) == len(set(paths)), "a line is repeated"
    assert sorted(Path(p) for p in paths) == sorted(folder.iterdir())
    assert all(r.get("answer") for r in lines)
    return lines
