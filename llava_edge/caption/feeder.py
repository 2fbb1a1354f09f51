"""The vision side of a caption run, on its own thread, ahead of the decoder: read, hash, encode.

Files with the same bytes are encoded once: a first pass hashes every file whose size another file shares
(only those can be copies) and puts each copy right after its first occurrence, so one embedding serves
them all and is dropped straight after. Distinct images go through the vision graph `batch` at a time.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..image import read_image_source
from ..runtime.image_budget import ImageBudget
from ..runtime.vision import EncodedImage, VisionEncoder


@dataclass
class Item:
    """One input file, ready for the decoder, or why it cannot be captioned."""

    path: str
    sha256: str | None = None
    image: EncodedImage | None = None
    error: str | None = None


END = None  # the last thing put on the queue


class Feeder(threading.Thread):
    def __init__(self, vision: VisionEncoder, paths: list[str], batch: int, depth: int,
                 budget: ImageBudget | None = None):
        super().__init__(name="llava-edge-caption-vision", daemon=True)
        self.vision, self.paths, self.batch = vision, paths, max(1, batch)
        self.budget = budget  # None: every image token
        self.tag = "" if budget is None else budget.tag
        self.items: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()
        self.encoded = 0  # vision graph runs, per image
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            self._encode_all(self._groups())
        except BaseException as e:  # handed to the decoder side, which re-raises it
            self.failure = e
        finally:
            self._put(END)

    def _groups(self) -> list[list[str]]:
        """The paths in order, each file with its copies (same bytes) right after it."""
        sizes = defaultdict(int)
        size_of = {}
        for p in self.paths:
            try:
                size_of[p] = os.stat(p).st_size
                sizes[size_of[p]] += 1
            except OSError:
                pass  # reported when it is read
        groups: dict[tuple[str, str], list[str]] = {}
        for p in self.paths:
            if self.stop.is_set():
                break
            key = ("path", p)
            if p in size_of and sizes[size_of[p]] > 1:
                try:
                    key = ("sha256", hashlib.sha256(read_image_source(p)[1]).hexdigest())
                except UserError:
                    pass  # its own group: the error is reported when it is read again
            groups.setdefault(key, []).append(p)
        return list(groups.values())

    def _encode_all(self, groups: list[list[str]]) -> None:
        pending: list[tuple[list[str], str, np.ndarray, float]] = []  # (paths, sha, pixels, preprocess ms)
        for paths in groups:
            if self.stop.is_set():
                return
            sha = None
            try:
                t0 = time.perf_counter()
                name, data = read_image_source(paths[0])
                sha = hashlib.sha256(data).hexdigest()
                pixels = self.vision.pixels(data, name)
            except UserError as e:  # a copy of a bad file is as bad: each gets its own line
                for p in paths:
                    self._put(Item(p, sha, error=str(e).replace(str(Path(paths[0])), p, 1)))
                continue
            pending.append((paths, sha, pixels, 1000 * (time.perf_counter() - t0)))
            if len(pending) == self.batch:
                self._flush(pending)
        self._flush(pending)

    def _flush(self, pending: list) -> None:
        if not pending:
            return
        t0 = time.perf_counter()
        embeds = self.vision.encode_pixels(np.stack([px for _, _, px, _ in pending]), self.budget)
        share = 1000 * (time.perf_counter() - t0) / len(pending)
        self.encoded += len(pending)
        for (paths, sha, _, prep_ms), e in zip(pending, embeds):
            e = np.ascontiguousarray(e)
            self._put(Item(paths[0], sha, EncodedImage(e, sha, prep_ms + share, False, self.tag)))
            for p in paths[1:]:
                self._put(Item(p, sha, EncodedImage(e, sha, 0.0, True, self.tag)))
        pending.clear()

    def _put(self, item) -> None:
        while True:
            try:
                self.items.put(item, timeout=0.1)
                return
            except queue.Full:
                if self.stop.is_set():  # the decoder side has stopped reading
                    return
