"""On-disk store of llama.cpp sequence-state blobs for image prompt prefixes (issue 18).

A later process asking about an image it has seen before restores the KV of the prompt prefix (system text +
image positions) instead of prefilling it. The engine calls `llama_state_seq_get_data` / `set_data` and hands
this store the bytes; nothing here touches llama.cpp.

One file per entry, `<key digest>.kv`:

    magic  b"LEKVCACH"     8 bytes
    format version         u32
    key length             u32
    payload length         u64
    sha256(key + payload)  32 bytes
    key                    canonical JSON of the PrefixKey
    payload                the state blob

An entry is used only when every field checks out and its key equals the one asked for; a corrupt, truncated,
stale (older format) or foreign entry is a miss and is deleted, so the next `put` replaces it. Entries are
written to a temporary file in the same directory and renamed into place, so a reader never sees half an
entry and concurrent writers of one key leave one whole entry. The store is bounded in bytes: a hit refreshes
the entry's mtime, and `put` evicts the least recently used entries beyond `max_bytes`.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

MAGIC = b"LEKVCACH"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIIQ32s")
SUFFIX = ".kv"
DEFAULT_MAX_BYTES = 4 << 30  # a 7B image prefix (f16 KV, ~640 positions) is ~330 MB: about a dozen images
_STALE_TMP_S = 3600  # a temporary file this old belongs to a writer that died


@dataclass(frozen=True)
class PrefixKey:
    """What a saved prefix state depends on. `runtime` is for anything else that changes the blob's layout or
    meaning (llama.cpp version, KV type, ...); the engine decides what goes in it."""

    decoder_sha256: str
    template: str
    image_sha256: str
    positions_sha256: str  # `positions_digest` of the prefix's positions
    runtime: str = ""

    def encoded(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    def digest(self) -> str:
        return hashlib.sha256(self.encoded()).hexdigest()


def positions_digest(positions: Iterable[int | str]) -> str:
    """sha256 of a prefix's positions: token ids (int) and image slots (str: the image's content hash, one per
    image position or one per image: the caller's choice, as long as it is the same every time)."""
    h = hashlib.sha256()
    run: list[int] = []

    def flush_tokens():
        if run:
            h.update(b"t" + np.asarray(run, dtype="<i8").tobytes())
            run.clear()

    for p in positions:
        if isinstance(p, str):
            flush_tokens()
            h.update(b"i" + p.encode() + b"\0")
        else:
            run.append(int(p))
    flush_tokens()
    return h.hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    rejected: int = 0  # entries found but not trusted (corrupt, truncated, stale, foreign) and deleted
    stored: int = 0
    evicted: int = 0


class KVCache:
    """A directory of prefix-state entries bounded by `max_bytes` (least recently used evicted first)."""

    def __init__(self, directory: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES):
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self.stats = CacheStats()

    def path(self, key: PrefixKey) -> Path:
        return self.directory / f"{key.digest()}{SUFFIX}"

    def get(self, key: PrefixKey) -> memoryview | None:
        """The payload saved under `key`, or None. It is a copy-on-write map of the file, writable so that ctypes
        can wrap it: a 7B prefix (~330 MB) is neither allocated nor copied before llama.cpp reads it."""
        path = self.path(key)
        try:
            f = open(path, "rb")
        except OSError:
            self.stats.misses += 1
            return None
        with f:
            payload = _read_entry(f, key.encoded())
            if payload is None:
                self._discard(path, os.fstat(f.fileno()))
                self.stats.rejected += 1
                self.stats.misses += 1
                return None
        try:
            os.utime(path)  # the LRU clock: last access
        except OSError:
            pass
        self.stats.hits += 1
        return payload

    def put(self, key: PrefixKey, payload) -> bool:
        """Save `payload` (any bytes-like object, e.g. a ctypes array) under `key`; False when it cannot fit."""
        view = memoryview(payload).cast("B")
        key_bytes = key.encoded()
        size = _HEADER.size + len(key_bytes) + view.nbytes
        if size > self.max_bytes:
            return False
        digest = hashlib.sha256(key_bytes)
        digest.update(view)
        header = _HEADER.pack(MAGIC, FORMAT_VERSION, len(key_bytes), view.nbytes, digest.digest())
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=SUFFIX)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(header)
                f.write(key_bytes)
                f.write(view)
            os.replace(tmp, self.path(key))
        except BaseException:
            _unlink(Path(tmp))
            raise
        self.stats.stored += 1
        self.evict(keep=self.path(key))
        return True

    def entries(self) -> list[tuple[Path, os.stat_result]]:
        """Complete entries (not temporary files), least recently used first."""
        found = []
        for path in self.directory.glob(f"*{SUFFIX}"):
            if path.name.startswith("."):
                continue
            try:
                found.append((path, path.stat()))
            except OSError:  # evicted by another process meanwhile
                pass
        return sorted(found, key=lambda e: e[1].st_mtime_ns)

    def total_bytes(self) -> int:
        return sum(st.st_size for _, st in self.entries())

    def evict(self, keep: Path | None = None) -> None:
        """Delete least recently used entries until the store fits `max_bytes`, and dead writers' temp files."""
        now = time.time()
        for tmp in self.directory.glob(f".tmp-*{SUFFIX}"):
            try:
                if now - tmp.stat().st_mtime > _STALE_TMP_S:
                    _unlink(tmp)
            except OSError:
                pass
        entries = self.entries()
        total = sum(st.st_size for _, st in entries)
        for path, st in entries:
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            self._discard(path, st)
            total -= st.st_size
            self.stats.evicted += 1

    def _discard(self, path: Path, seen: os.stat_result) -> None:
        """Delete `path` only if it is still the file that was judged (a writer may have replaced it since)."""
        try:
            now = path.stat()
        except OSError:
            return
        if (now.st_ino, now.st_dev) == (seen.st_ino, seen.st_dev):
            _unlink(path)


def _read_entry(f, key_bytes: bytes) -> memoryview | None:
    """The payload of an open entry file if its header, key, length and checksum all match; else None."""
    header = f.read(_HEADER.size)
    if len(header) != _HEADER.size:
        return None
    magic, version, key_len, payload_len, checksum = _HEADER.unpack(header)
    if magic != MAGIC or version != FORMAT_VERSION or key_len != len(key_bytes):
        return None
    if os.fstat(f.fileno()).st_size != _HEADER.size + key_len + payload_len:
        return None
    if f.read(key_len) != key_bytes:
        return None
    # Writers replace entries by rename, never in place, so the mapped file does not change under the map.
    whole = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    payload = memoryview(whole)[_HEADER.size + key_len:]
    digest = hashlib.sha256(key_bytes)
    digest.update(payload)
    return payload if digest.digest() == checksum else None


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
