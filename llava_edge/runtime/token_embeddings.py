"""Rows of the decoder's token-embedding table, read from its GGUF and dequantized as llama.cpp does. No torch.

llama.cpp takes a batch of token ids or a batch of embeddings, never both. A prompt's text next to an image would
cost a decode of its own, and on a CPU every decode pays for a pass over the weights (at 7B on 2 cores, 0.3 s even
for one position). With the text's embedding rows at hand, text and image go in one decode.

The rows must be the ones llama.cpp computes, bit for bit. They are, for the types below: each value is a small
integer times a scale whose product is exact in float32, less an exact offset, so one rounding at most, the same
with or without a fused multiply-add. `tests/test_gguf.py` checks it against llama.cpp's own token path.
Other types give None (the engine then decodes text as tokens, as before).
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

from .gguf_file import F16, F32, Q4_0, Q4_K, Q5_K, Q8_0, read_tensor_infos

TENSOR = "token_embd.weight"
BLOCK = {F32: (1, 4), F16: (1, 2), Q4_0: (32, 18), Q8_0: (32, 34), Q4_K: (256, 144), Q5_K: (256, 176)}


class TokenEmbeddings:
    """The token_embd table of a GGUF, memory-mapped; `rows(ids)` -> float32 [len(ids), n_embd]."""

    def __init__(self, data: memoryview, ggml_type: int, n_embd: int, n_vocab: int):
        self.ggml_type, self.n_embd, self.n_vocab = ggml_type, n_embd, n_vocab
        self.row_bytes = row_bytes(ggml_type, n_embd)
        self._data = data

    @classmethod
    def open(cls, gguf_path: str | Path) -> TokenEmbeddings | None:
        """None when the table's type is not one this module dequantizes exactly."""
        with open(gguf_path, "rb") as f:
            whole = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        found = (read_tensor_infos(whole) or {}).get(TENSOR)
        if found is None:
            return None
        ggml_type, (n_embd, n_vocab), offset = found.ggml_type, found.dims, found.offset
        if ggml_type not in BLOCK or n_embd % BLOCK[ggml_type][0]:
            return None
        size = n_vocab * row_bytes(ggml_type, n_embd)
        return cls(memoryview(whole)[offset:offset + size], ggml_type, n_embd, n_vocab)

    def rows(self, ids: list[int]) -> np.ndarray:
        raw = np.frombuffer(self._data, dtype=np.uint8).reshape(self.n_vocab, self.row_bytes)[np.asarray(ids)]
        return _DEQUANTIZE[self.ggml_type](raw).reshape(len(ids), self.n_embd)


def row_bytes(ggml_type: int, n_embd: int) -> int:
    per_block, block_bytes = BLOCK[ggml_type]
    return n_embd // per_block * block_bytes


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view("<f2").astype(np.float32)


def _dequantize_f32(raw):
    return np.ascontiguousarray(raw).view("<f4").astype(np.float32)


def _dequantize_q8_0(raw):
    b = raw.reshape(-1, 34)
    return (b[:, 2:].view(np.int8).astype(np.float32) * _f16(b[:, :2])).reshape(-1)


def _dequantize_q4_0(raw):
    b = raw.reshape(-1, 18)
    q = b[:, 2:]
    values = np.concatenate([q & 0x0F, q >> 4], axis=1).astype(np.float32) - 8  # low nibbles first, then high
    return (values * _f16(b[:, :2])).reshape(-1)


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit (scale, min) pairs packed in a K-quant block's 12 bytes: [blocks, 8] each."""
    s = scales.astype(np.uint8)
    low = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mins = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return low.astype(np.float32), mins.astype(np.float32)


def _k_quant(d, dmin, sc, m, q):
    """d * sc * q - dmin * m per 32-value group, q [blocks, 8, 32] in the groups' order."""
    d1 = (d * sc)[:, :, None]
    m1 = (dmin * m)[:, :, None]
    return (d1 * q.astype(np.float32) - m1).reshape(-1)


def _nibble_groups(qs: np.ndarray) -> np.ndarray:
    """128 bytes -> 8 groups of 32: for each 32-byte chunk, its low nibbles then its high nibbles."""
    chunks = qs.reshape(-1, 4, 32)
    return np.stack([chunks & 0x0F, chunks >> 4], axis=2).reshape(-1, 8, 32)


def _dequantize_q4_k(raw):
    b = raw.reshape(-1, 144)
    sc, m = _k_scales(b[:, 4:16])
    return _k_quant(_f16(b[:, 0:2]), _f16(b[:, 2:4]), sc, m, _nibble_groups(b[:, 16:]))


def _dequantize_q5_k(raw):
    b = raw.reshape(-1, 176)
    sc, m = _k_scales(b[:, 4:16])
    qh = b[:, 16:48]
    high = np.stack([(qh >> bit) & 1 for bit in range(8)], axis=1)  # group g takes bit g of qh
    q = _nibble_groups(b[:, 48:]) + (high << 4)
    return _k_quant(_f16(b[:, 0:2]), _f16(b[:, 2:4]), sc, m, q)


_DEQUANTIZE = {F32: _dequantize_f32, F16: lambda raw: _f16(raw), Q8_0: _dequantize_q8_0, Q4_0: _dequantize_q4_0,
               Q4_K: _dequantize_q4_k, Q5_K: _dequantize_q5_k}
