"""A llama-cpp-python `Llama` built with the native parameters it has no argument for.

`use_extra_bufts` (llama.cpp's AMX / repacked CPU kernels) and the context's sequence count are not
exposed by `Llama`, so they are set on the parameter structs while `Llama.__init__` builds them (under a
lock: the hook is process-wide). Used by the loader and by the probe's child process; no checks here
(`llama_loader.open_llama` validates first). No torch.
"""

from __future__ import annotations

import contextlib
import os
import threading

import llama_cpp
import llama_cpp.llama_cpp as llama_cpp_c

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
    kv_type: int | None = None,
    logits_all: bool = False,
    seed: int = 0,
    verbose: bool = False,
    n_seq_max: int = 1,
    **llama_kwargs,
) -> llama_cpp.Llama:
    """A `Llama` with explicit extra-buffer-type choice; ubatch = batch, so one decode call of up to
    n_batch positions (tokens or embeddings) is a single graph. n_ctx is the whole context: with
    n_seq_max > 1 each sequence holds n_ctx / n_seq_max positions. kv_type: a ggml type for K and V (None:
    llama.cpp's default, f16); a `type_v` in llama_kwargs gives V its own (experiments only)."""
    type_v = llama_kwargs.pop("type_v", kv_type)
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
            type_v=type_v,
            seed=seed,
            verbose=verbose,
            **llama_kwargs,
        )
