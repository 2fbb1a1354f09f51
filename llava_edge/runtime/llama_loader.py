"""Open a GGUF decoder in llama-cpp-python with the settings the runtime needs, never in a way that crashes.

`use_extra_bufts` (llama.cpp's AMX / repacked CPU kernels) is decided by `llama_probe`: some builds die
with SIGILL in those kernels. llama-cpp-python's `Llama` does not expose that model parameter, so it is
set on the parameter struct while `Llama.__init__` builds it (under a lock: the hook is process-wide).
No torch here.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

import llama_cpp
import llama_cpp.llama_cpp as llama_cpp_c

from ..errors import UserError
from .llama_probe import extra_bufts_verdict

_PARAMS_HOOK = threading.Lock()


@contextlib.contextmanager
def _native_params(use_extra_bufts: bool, n_seq_max: int):
    """Set what `Llama` has no argument for: the model's extra buffer types, the context's sequence count
    (each of the n_seq_max sequences gets n_ctx / n_seq_max positions: kv_unified off)."""
    model_defaults = llama_cpp_c.llama_model_default_params
    context_defaults = llama_cpp_c.llama_context_default_params

    def model_params():
        params = model_defaults()
        params.use_extra_bufts = use_extra_bufts
        return params

    def context_params():
        params = context_defaults()
        params.n_seq_max = n_seq_max
        params.kv_unified = False
        return params

    with _PARAMS_HOOK:
        llama_cpp_c.llama_model_default_params = model_params
        llama_cpp_c.llama_context_default_params = context_params
        try:
            yield
        finally:
            llama_cpp_c.llama_model_default_params = model_defaults
            llama_cpp_c.llama_context_default_params = context_defaults


def construct_llama(
    gguf_path: str | os.PathLike,
    extra_bufts: bool,
    n_ctx: int,
    n_batch: int,
    n_threads: int,
    f32_kv: bool = False,
    logits_all: bool = False,
    seed: int = 0,
    verbose: bool = False,
    n_seq_max: int = 1,
    **llama_kwargs,
) -> llama_cpp.Llama:
    """A `Llama` with explicit extra-buffer-type choice; ubatch = batch, so one decode call of up to
    n_batch positions (tokens or embeddings) is a single graph. n_ctx is the whole context: with
    n_seq_max > 1 each sequence holds n_ctx / n_seq_max positions."""
    kv_type = llama_cpp.GGML_TYPE_F32 if f32_kv else None
    with _native_params(extra_bufts, n_seq_max):
        return llama_cpp.Llama(
            model_path=str(gguf_path),
            n_ctx=n_ctx,
            n_batch=n_batch,
            n_ubatch=n_batch,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            logits_all=logits_all,
            type_k=kv_type,
            type_v=kv_type,
            seed=seed,
            verbose=verbose,
            **llama_kwargs,
        )


def open_llama(
    gguf_path: str | os.PathLike,
    n_ctx: int = 4096,
    n_threads: int | None = None,
    n_batch: int = 512,
    f32_kv: bool = False,
    logits_all: bool = False,
    extra_bufts: bool | None = None,
    seed: int = 0,
    verbose: bool = False,
    n_seq_max: int = 1,
    **llama_kwargs,
) -> llama_cpp.Llama:
    """Load a GGUF decoder; llama_kwargs go to `Llama` (e.g. a chat_handler). `extra_bufts=None` asks the
    cached probe whether llama.cpp's extra CPU buffer types are safe here; a bad file is a UserError (one
    line), not a native abort."""
    path = Path(gguf_path)
    if not path.is_file():
        raise UserError(f"{path}: decoder GGUF not found")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{path}: not a GGUF file")
    if n_ctx < 1 or n_batch < 1:
        raise UserError(f"n_ctx ({n_ctx}) and n_batch ({n_batch}) must be positive")
    if extra_bufts is None:
        extra_bufts = extra_bufts_verdict().extra_bufts
    threads = n_threads or max(1, os.cpu_count() or 1)
    try:
        return construct_llama(
            path, extra_bufts, n_ctx, min(n_batch, n_ctx), threads, f32_kv, logits_all, seed, verbose, n_seq_max,
            **llama_kwargs,
        )
    except ValueError as e:  # llama-cpp-python's "Failed to load model from file"
        raise UserError(f"{path}: llama.cpp could not load it ({e})") from None
