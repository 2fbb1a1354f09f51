"""Open a GGUF decoder in llama-cpp-python with the settings the runtime needs, never in a way that crashes.

`use_extra_bufts` (llama.cpp's AMX / repacked CPU kernels) is decided by `llama_probe`: some builds die
with SIGILL in those kernels. No torch here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import llama_cpp

from ..errors import UserError
from .llama_construct import construct_llama
from .kv_type import check_kv_type, needs_flash_attn
from .llama_probe import extra_bufts_verdict

_warned: set[str] = set()


def decoder_gpu_layers(device: str, gpu_offload: bool | None = None) -> int:
    """Decoder layers llama.cpp puts on the GPU for a device choice: all of them (-1) where this llama.cpp build
    offloads (a CUDA, Metal or Vulkan build) and the device is not "cpu", else none. An explicit GPU choice that
    this build cannot serve runs on the CPU with one note on stderr (once per process), as vision does."""
    if gpu_offload is None:
        gpu_offload = bool(llama_cpp.llama_supports_gpu_offload())
    if device == "cpu":
        return 0
    if gpu_offload:
        return -1
    if device in ("cuda", "tensorrt") and device not in _warned:
        _warned.add(device)
        print(f"llava-edge: llama-cpp-python here was built without GPU offload; the decoder runs on the CPU "
              f"(rebuild it with CMAKE_ARGS=\"-DGGML_CUDA=on\" for {device})", file=sys.stderr)
    return 0


def open_llama(
    gguf_path: str | os.PathLike,
    n_ctx: int = 4096,
    n_threads: int | None = None,
    n_batch: int = 512,
    kv_type: str = "f16",
    logits_all: bool = False,
    extra_bufts: bool | None = None,
    seed: int = 0,
    verbose: bool = False,
    n_seq_max: int = 1,
    flash_attn: bool | None = None,
    n_gpu_layers: int = 0,
    **llama_kwargs,
) -> llama_cpp.Llama:
    """Load a GGUF decoder; llama_kwargs go to `Llama` (e.g. a chat_handler). `extra_bufts=None` asks the
    cached probe whether llama.cpp's extra CPU buffer types are safe here; a bad file is a UserError (one
    line), not a native abort. `flash_attn=None`: on, except with an f32 KV cache (the exact parity runs): it
    prefilled a 576-position image 1.09-1.12x faster at 7B width on the 2-core Xeon, decode unchanged
    (bench/decoder_knobs.py). kv_type: f16|q8_0|q4_0|f32 (kv_type.py); a quantized one needs flash attention."""
    path = Path(gguf_path)
    if not path.is_file():
        raise UserError(f"{path}: decoder GGUF not found")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{path}: not a GGUF file")
    if n_ctx < 1 or n_batch < 1:
        raise UserError(f"n_ctx ({n_ctx}) and n_batch ({n_batch}) must be positive")
    flash_attn = kv_type != "f32" if flash_attn is None else flash_attn
    ggml_kv_type = kv_cache_type(kv_type, flash_attn)
    if extra_bufts is None:
        extra_bufts = extra_bufts_verdict().extra_bufts
    threads = n_threads or max(1, os.cpu_count() or 1)
    try:
        return construct_llama(
            path, extra_bufts, n_ctx, min(n_batch, n_ctx), threads, ggml_kv_type, logits_all, seed, verbose,
            n_seq_max, flash_attn=flash_attn, n_gpu_layers=n_gpu_layers, **llama_kwargs,
        )
    except ValueError as e:  # llama-cpp-python's "Failed to load model from file" / "... create llama_context"
        raise UserError(f"{path}: llama.cpp could not load it with a {kv_type} KV cache ({e})") from None


def kv_cache_type(kv_type: str, flash_attn: bool) -> int:
    """llama.cpp's ggml type for a KV type name, checked against this build before any native call."""
    check_kv_type(kv_type)
    ggml_type = getattr(llama_cpp, f"GGML_TYPE_{kv_type.upper()}", None)
    if ggml_type is None:
        raise UserError(f"this llama.cpp build (llama-cpp-python {llama_cpp.__version__}) has no {kv_type} KV cache")
    if needs_flash_attn(kv_type) and not flash_attn:
        raise UserError(f"a {kv_type} KV cache needs flash attention (llama.cpp quantizes V only with it)")
    return ggml_type
