"""GGUF files read and written with numpy alone: the one place outside export/ that parses or writes the format.

gguf-py (export's writer) is not in the runtime install, yet the runtime reads a GGUF (the token-embedding table)
and writes one (the probe model); bench reuses the writer. The reader finds tensors by name; the writer streams
tensors to disk one at a time. Both follow the GGUF v3 layout: header, metadata, tensor infos, aligned data.
No torch.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"GGUF"
VERSION = 3
ALIGNMENT = 32  # the default; a file may set general.alignment

# ggml tensor types
F32, F16, Q4_0, Q8_0, Q4_K, Q5_K = 0, 1, 2, 8, 12, 13

# metadata value types
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_SCALAR = {UINT8: "B", INT8: "b", UINT16: "H", INT16: "h", UINT32: "I", INT32: "i", FLOAT32: "f", BOOL: "?",
           UINT64: "Q", INT64: "q", FLOAT64: "d"}


@dataclass(frozen=True)
class TensorInfo:
    ggml_type: int
    dims: tuple[int, ...]  # fastest-varying first, as GGUF lists them
    offset: int  # absolute, in the file


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: shape with rows first (numpy's order), and its ggml type (F32 or F16 here)."""
    name: str
    shape: tuple[int, ...]
    ggml_type: int

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * (4 if self.ggml_type == F32 else 2)


# ----------------------------------------------------------------------------- reading


def read_tensor_infos(buf) -> dict[str, TensorInfo] | None:
    """Every tensor of a GGUF (v2 or v3) in a buffer (an mmap, bytes): name -> TensorInfo; None if not a GGUF."""
    if bytes(buf[:4]) != MAGIC:
        return None
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version < 2:
        return None
    pos, alignment = 24, ALIGNMENT
    for _ in range(n_kv):
        key, pos = _read_string(buf, pos)
        (kind,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if key == "general.alignment" and kind == UINT32:
            (alignment,) = struct.unpack_from("<I", buf, pos)
        pos = _skip_value(buf, kind, pos)
    found = {}
    for _ in range(n_tensors):
        name, pos = _read_string(buf, pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        ggml_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        found[name] = (ggml_type, dims, offset)
    data_start = -(-pos // alignment) * alignment
    return {name: TensorInfo(t, d, data_start + o) for name, (t, d, o) in found.items()}


def _read_string(buf, at: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, at)
    return bytes(buf[at + 8:at + 8 + n]).decode("utf-8", "replace"), at + 8 + n


def _skip_value(buf, kind: int, at: int) -> int:
    if kind in _SCALAR:
        return at + struct.calcsize("<" + _SCALAR[kind])
    if kind == STRING:
        return _read_string(buf, at)[1]
    if kind == ARRAY:
        item, n = struct.unpack_from("<IQ", buf, at)
        at += 12
        if item in _SCALAR:
            return at + n * struct.calcsize("<" + _SCALAR[item])
        for _ in range(n):
            at = _skip_value(buf, item, at)
        return at
    raise ValueError(f"unknown GGUF value type {kind}")


# ----------------------------------------------------------------------------- writing


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def metadata(key: str, kind: int, value) -> bytes:
    """One metadata entry; an ARRAY's value is (item kind, items)."""
    out = _string(key) + struct.pack("<I", kind)
    if kind == STRING:
        return out + _string(value)
    if kind in _SCALAR:
        return out + struct.pack("<" + _SCALAR[kind], value)
    item_kind, items = value
    out += struct.pack("<IQ", item_kind, len(items))
    if item_kind == STRING:
        return out + b"".join(_string(x) for x in items)
    return out + struct.pack(f"<{len(items)}{_SCALAR[item_kind]}", *items)


def write_gguf(path: Path, entries: Iterable[bytes], tensors: list[TensorSpec],
               data: Callable[[int, TensorSpec], np.ndarray]) -> Path:
    """A GGUF v3 file: metadata `entries` (from `metadata`), then the tensors, each one's values made by
    `data(index, spec)` only when it is written (one tensor in memory at a time). Written to a temp file that
    replaces `path` at the end."""
    entries = list(entries)
    infos, offset = [], 0
    for spec in tensors:
        dims = spec.shape[::-1]  # GGUF lists the fastest-varying dimension first
        infos.append(_string(spec.name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
                     + struct.pack("<IQ", spec.ggml_type, offset))
        offset += -(-spec.nbytes // ALIGNMENT) * ALIGNMENT
    head = MAGIC + struct.pack("<IQQ", VERSION, len(tensors), len(entries)) + b"".join(entries) + b"".join(infos)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(head + b"\0" * (-len(head) % ALIGNMENT))
        for i, spec in enumerate(tensors):
            array = np.ascontiguousarray(data(i, spec), np.float32 if spec.ggml_type == F32 else np.float16)
            f.write(array.tobytes())
            f.write(b"\0" * (-array.nbytes % ALIGNMENT))
    tmp.replace(path)
    return path
