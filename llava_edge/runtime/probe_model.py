"""A tiny random `llama` GGUF written with numpy alone (the runtime has neither torch nor gguf-py).

Used by `llama_probe`: quantized with llama.cpp's own quantizer, it exercises the same CPU kernels as a
real model. Dimensions are multiples of 256 so every K-quant and the AMX/repack paths apply.
"""

from __future__ import annotations

import ctypes
import struct
from pathlib import Path

import numpy as np

GGUF_MAGIC = 0x46554747  # "GGUF" little-endian
GGUF_VERSION = 3
ALIGNMENT = 32
_UINT32, _FLOAT32, _BOOL, _STRING, _ARRAY, _INT32 = 4, 6, 7, 8, 9, 5
_GGML_F32 = 0

N_EMBD, N_FF, N_HEAD, N_LAYER = 256, 512, 2, 1
SPECIALS = ["<unk>", "<s>", "</s>"]
N_VOCAB = 288  # 3 specials + 256 byte tokens + filler, a multiple of 32


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _kv(key: str, vtype: int, value) -> bytes:
    out = _string(key) + struct.pack("<I", vtype)
    if vtype == _UINT32:
        return out + struct.pack("<I", value)
    if vtype == _FLOAT32:
        return out + struct.pack("<f", value)
    if vtype == _BOOL:
        return out + struct.pack("<?", value)
    if vtype == _STRING:
        return out + _string(value)
    item_type, items = value
    out += struct.pack("<IQ", item_type, len(items))
    fmt = {_FLOAT32: "<f", _INT32: "<i"}
    return out + b"".join(_string(x) if item_type == _STRING else struct.pack(fmt[item_type], x) for x in items)


def probe_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)

    def w(*shape):
        return (rng.standard_normal(shape) * 0.05).astype(np.float32)

    t = {"token_embd.weight": w(N_VOCAB, N_EMBD)}
    for i in range(N_LAYER):
        t.update({
            f"blk.{i}.attn_norm.weight": np.ones(N_EMBD, np.float32),
            f"blk.{i}.attn_q.weight": w(N_EMBD, N_EMBD),
            f"blk.{i}.attn_k.weight": w(N_EMBD, N_EMBD),
            f"blk.{i}.attn_v.weight": w(N_EMBD, N_EMBD),
            f"blk.{i}.attn_output.weight": w(N_EMBD, N_EMBD),
            f"blk.{i}.ffn_norm.weight": np.ones(N_EMBD, np.float32),
            f"blk.{i}.ffn_gate.weight": w(N_FF, N_EMBD),
            f"blk.{i}.ffn_up.weight": w(N_FF, N_EMBD),
            f"blk.{i}.ffn_down.weight": w(N_EMBD, N_FF),
        })
    t["output_norm.weight"] = np.ones(N_EMBD, np.float32)
    t["output.weight"] = w(N_VOCAB, N_EMBD)
    return t


def write_probe_gguf(path: Path) -> Path:
    tokens = SPECIALS + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"t{i}" for i in range(N_VOCAB - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (N_VOCAB - 259)  # UNKNOWN, CONTROL, BYTE, NORMAL
    kvs = [
        _kv("general.architecture", _STRING, "llama"),
        _kv("general.file_type", _UINT32, 0),
        _kv("llama.context_length", _UINT32, 256),
        _kv("llama.embedding_length", _UINT32, N_EMBD),
        _kv("llama.block_count", _UINT32, N_LAYER),
        _kv("llama.feed_forward_length", _UINT32, N_FF),
        _kv("llama.attention.head_count", _UINT32, N_HEAD),
        _kv("llama.attention.head_count_kv", _UINT32, N_HEAD),
        _kv("llama.attention.layer_norm_rms_epsilon", _FLOAT32, 1e-5),
        _kv("llama.rope.dimension_count", _UINT32, N_EMBD // N_HEAD),
        _kv("tokenizer.ggml.model", _STRING, "llama"),
        _kv("tokenizer.ggml.tokens", _ARRAY, (_STRING, tokens)),
        _kv("tokenizer.ggml.scores", _ARRAY, (_FLOAT32, [0.0] * N_VOCAB)),
        _kv("tokenizer.ggml.token_type", _ARRAY, (_INT32, types)),
        _kv("tokenizer.ggml.bos_token_id", _UINT32, 1),
        _kv("tokenizer.ggml.eos_token_id", _UINT32, 2),
        _kv("tokenizer.ggml.unknown_token_id", _UINT32, 0),
    ]
    tensors = probe_tensors()
    infos, offset = [], 0
    for name, array in tensors.items():
        dims = array.shape[::-1]  # GGUF lists the fastest-varying dimension first
        infos.append(_string(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
                     + struct.pack("<IQ", _GGML_F32, offset))
        offset += -(-array.nbytes // ALIGNMENT) * ALIGNMENT
    head = struct.pack("<IIQQ", GGUF_MAGIC, GGUF_VERSION, len(tensors), len(kvs)) + b"".join(kvs) + b"".join(infos)
    with open(path, "wb") as f:
        f.write(head + b"\0" * (-len(head) % ALIGNMENT))
        for array in tensors.values():
            f.write(array.tobytes())
            f.write(b"\0" * (-array.nbytes % ALIGNMENT))
    return Path(path)


def quantize_probe(src: Path, dst: Path, kind: str) -> Path:
    """llama.cpp's quantizer on the probe model, one thread, no progress or checks (the runtime has no quant/:
    `quant.gguf.quantize_gguf` is the export's, with validation and progress)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + kind)
    params.nthread = 1
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama.cpp could not quantize the probe model to {kind}")
    return Path(dst)
