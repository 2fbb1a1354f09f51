"""The --out JSONL of a caption run (and eval's --predictions): whole lines appended, fsync'd in batches, one
writer at a time.

A line is written with one write() of the whole encoded line, newline last, so a killed process leaves at
most a torn last line without its newline; opening the file again cuts that tail off, and the complete lines
say what is done, so a rerun never writes an answered image twice. A line with `error` is not done: a rerun
tries that input again and appends its new line, which supersedes the error line (the last line of a key is
the one that holds).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Hashable
from pathlib import Path

from ..errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no advisory lock; one run per file is then the user's to keep
    fcntl = None


def done_key(path: str, prompt: str, fmt=None, image_tokens: int | None = None) -> tuple:
    """What makes a line done: the same file (by absolute path) asked the same prompt, for an answer in the same
    format (--format) from the same tokens per image (--image-tokens). A rerun with another of these answers
    again."""
    return os.path.abspath(path), prompt, json.dumps(fmt, sort_keys=True), image_tokens


def record_key(record: dict) -> tuple:
    """The done key of a line (lines written before --format and --image-tokens were in the key lack them)."""
    return done_key(record["path"], record["prompt"], record.get("format"), record.get("image_tokens"))


def run_fields(fmt, image_tokens: int | None) -> dict:
    """What every line of a run carries besides its prompt: its format and tokens per image, where set."""
    return {**({"format": fmt} if fmt is not None else {}),
            **({"image_tokens": image_tokens} if image_tokens is not None else {})}


class ResultFile:
    """key: what makes a line done (a KeyError or TypeError: not a line of this kind); option: the flag named in
    errors; lines: after open(), the last complete line of each done key."""

    def __init__(self, path: str | os.PathLike, fsync_lines: int = 16, fsync_seconds: float = 2.0,
                 key: Callable[[dict], Hashable] = record_key, option: str = "--out"):
        self.path = Path(path)
        self.key, self.option = key, option
        self.lines: dict[Hashable, dict] = {}
        self.fsync_lines, self.fsync_seconds = fsync_lines, fsync_seconds
        self._fd: int | None = None
        self._unsynced = 0
        self._last_sync = time.monotonic()

    def open(self) -> set[tuple]:
        """Open for appending (created if missing), cut a torn last line, and return the done keys: those whose
        last line holds an answer (an error line's input is tried again)."""
        if self.path.is_dir():
            raise UserError(f"{self.option} {self.path} is a directory; give a .jsonl file")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as e:
            raise UserError(f"{self.option} {self.path}: cannot open it for writing ({e.strerror or e})") from None
        if fcntl is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                self.close()
                raise UserError(f"{self.option} {self.path}: another run is writing it") from None
        with open(self._fd, "rb", closefd=False) as f:
            data = f.read()
        complete = data[: data.rfind(b"\n") + 1]
        if len(complete) < len(data):
            os.ftruncate(self._fd, len(complete))
            os.fsync(self._fd)
            print(f"llava-edge: note: cut a torn last line ({len(data) - len(complete)} bytes) off {self.path}",
                  file=sys.stderr)
        unreadable = 0
        for line in complete.splitlines():
            try:
                record = json.loads(line)
                key = self.key(record)
            except (ValueError, KeyError, TypeError):
                unreadable += 1
                continue
            if "error" in record:
                self.lines.pop(key, None)
            else:
                self.lines[key] = record
        if unreadable:
            print(f"llava-edge: note: {unreadable} lines of {self.path} are not records of this kind; left as they "
                  "are", file=sys.stderr)
        return set(self.lines)

    def append(self, record: dict) -> None:
        line = memoryview((json.dumps(record, ensure_ascii=False) + "\n").encode())
        while line:
            n = os.write(self._fd, line)
            line = line[n:]
        self._unsynced += 1
        if self._unsynced >= self.fsync_lines or time.monotonic() - self._last_sync >= self.fsync_seconds:
            self.sync()

    def sync(self) -> None:
        if self._fd is not None and self._unsynced:
            os.fsync(self._fd)
        self._unsynced, self._last_sync = 0, time.monotonic()

    def close(self) -> None:
        if self._fd is not None:
            self.sync()
            os.close(self._fd)  # releases the lock
            self._fd = None
