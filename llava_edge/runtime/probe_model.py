"""A tiny random `llama` GGUF, written with `gguf_file` (the runtime has neither torch nor gguf-py).

Used by `llama_probe`: quantized with llama.cpp's own quantizer, it exercises the same CPU kernels as a
real model. Dimensions are multiples of 256 so every K-quant and the AMX/repack paths apply.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from . import gguf_file as gg

N_EMBD, N_FF, N_HEAD, N_LAYER = 256, 512, 2, 1
SPECIALS = ["<unk>", "<s>", "</s>"]
N_VOCAB = 288  # 3 specials + 256 byte tokens + filler, a multiple of 32


def llama_metadata(n_vocab: int, n_embd: int, n_ff: int, n_head: int, n_layer: int, n_ctx: int,
                   file_type: int) -> list[bytes]:
    """The metadata of a `llama` GGUF with a byte-level vocab of n_vocab tokens (specials, bytes, filler)."""
    tokens = SPECIALS + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"t{i}" for i in range(n_vocab - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (n_vocab - 259)  # UNKNOWN, CONTROL, BYTE, NORMAL
    u32, f32, s = gg.UINT32, gg.FLOAT32, gg.STRING
    return [
        gg.metadata("general.architecture", s, "llama"), gg.metadata("general.file_type", u32, file_type),
        gg.metadata("llama.context_length", u32, n_ctx), gg.metadata("llama.embedding_length", u32, n_embd),
        gg.metadata("llama.block_count", u32, n_layer), gg.metadata("llama.feed_forward_length", u32, n_ff),
        gg.metadata("llama.attention.head_count", u32, n_head),
        gg.metadata("llama.attention.head_count_kv", u32, n_head),
        gg.metadata("llama.attention.layer_norm_rms_epsilon", f32, 1e-5),
        gg.metadata("llama.rope.dimension_count", u32, n_embd // n_head),
        gg.metadata("tokenizer.ggml.model", s, "llama"),
        gg.metadata("tokenizer.ggml.tokens", gg.ARRAY, (s, tokens)),
        gg.metadata("tokenizer.ggml.scores", gg.ARRAY, (f32, [0.0] * n_vocab)),
        gg.metadata("tokenizer.ggml.token_type", gg.ARRAY, (gg.INT32, types)),
        gg.metadata("tokenizer.ggml.bos_token_id", u32, 1), gg.metadata("tokenizer.ggml.eos_token_id", u32, 2),
        gg.metadata("tokenizer.ggml.unknown_token_id", u32, 0),
    ]


def llama_tensors(n_vocab: int, n_embd: int, n_ff: int, n_layer: int, weight_type: int) -> list[gg.TensorSpec]:
    """llama.cpp's llama layout: 2-D weights of weight_type, norms in F32."""
    def w(name, *shape):
        return gg.TensorSpec(name, shape, weight_type)

    def norm(name):
        return gg.TensorSpec(name, (n_embd,), gg.F32)

    t = [w("token_embd.weight", n_vocab, n_embd)]
    for i in range(n_layer):
        b = f"blk.{i}."
        t += [norm(b + "attn_norm.weight"), w(b + "attn_q.weight", n_embd, n_embd),
              w(b + "attn_k.weight", n_embd, n_embd), w(b + "attn_v.weight", n_embd, n_embd),
              w(b + "attn_output.weight", n_embd, n_embd), norm(b + "ffn_norm.weight"),
              w(b + "ffn_gate.weight", n_ff, n_embd), w(b + "ffn_up.weight", n_ff, n_embd),
              w(b + "ffn_down.weight", n_embd, n_ff)]
    return t + [norm("output_norm.weight"), w("output.weight", n_vocab, n_embd)]


def write_probe_gguf(path: Path, seed: int = 0) -> Path:
    """The probe model: F32, N(0, 0.05) weights, unit norms."""
    rng = np.random.default_rng(seed)

    def values(_, spec: gg.TensorSpec) -> np.ndarray:
        if len(spec.shape) == 1:
            return np.ones(spec.shape, np.float32)
        return (rng.standard_normal(spec.shape) * 0.05).astype(np.float32)

    return gg.write_gguf(path, llama_metadata(N_VOCAB, N_EMBD, N_FF, N_HEAD, N_LAYER, 256, file_type=0),
                         llama_tensors(N_VOCAB, N_EMBD, N_FF, N_LAYER, gg.F32), values)


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
