"""llama.cpp's own image embeddings for an mmproj GGUF, through llama-cpp-python's mtmd bindings.

Used to check that an mmproj loads in stock llama.cpp and to measure how far its image tokens are from
the reference (and, in bench, how long its image encode takes). No torch.

mtmd needs a text model next to the projector (it checks that the projector's output width is the
model's n_embd); any llama GGUF of that width will do, its weights are not used for the image.
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass

import numpy as np


@dataclass
class LlamaCppImage:
    embeddings: np.ndarray  # [n_image_tokens, n_embd] float32
    encode_ms: float  # mtmd_encode_chunk: llama.cpp's preprocessing excluded, CLIP + projector included
    encode_ms_runs: list[float]  # every encode when repeated (the first is a warm-up)


def llamacpp_image_embeddings(
    mmproj_path: str | os.PathLike,
    text_model_path: str | os.PathLike,
    rgb: np.ndarray,
    threads: int | None = None,
    verbose: bool = False,
    repeats: int = 1,
) -> LlamaCppImage:
    """One RGB uint8 image [H, W, 3] through llama.cpp's mtmd (its own preprocessing, CLIP graph and projector)."""
    import llama_cpp
    import llama_cpp.mtmd_cpp as mtmd

    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {rgb.shape}")
    threads = threads or int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    quiet_logs(mtmd, verbose)
    llama_cpp.llama_backend_init()
    model_params = llama_cpp.llama_model_default_params()
    model_params.n_gpu_layers = 0
    model = llama_cpp.llama_model_load_from_file(str(text_model_path).encode(), model_params)
    if not model:
        raise RuntimeError(f"llama.cpp could not load the text model {text_model_path}")
    ctx = bitmap = chunks = None
    try:
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = False
        params.n_threads = threads
        params.print_timings = False
        params.warmup = False
        ctx = mtmd.mtmd_init_from_file(str(mmproj_path).encode(), model, params)
        if not ctx:
            raise RuntimeError(f"llama.cpp's mtmd could not load the mmproj {mmproj_path}")
        height, width = rgb.shape[:2]
        bitmap = mtmd.mtmd_bitmap_init(width, height, rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        chunks = mtmd.mtmd_input_chunks_init()
        marker = mtmd.mtmd_default_marker()
        text = mtmd.mtmd_input_text(marker, len(marker), False, True)
        bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
        if mtmd.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
            raise RuntimeError("mtmd_tokenize failed")
        chunk = image_chunk(mtmd, chunks)
        n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
        runs = []
        for _ in range(max(1, repeats)):
            start = time.perf_counter()
            if mtmd.mtmd_encode_chunk(ctx, chunk) != 0:
                raise RuntimeError("mtmd_encode_chunk failed")
            runs.append((time.perf_counter() - start) * 1000)
        n_embd = llama_cpp.llama_model_n_embd(model)
        out = mtmd.mtmd_get_output_embd(ctx)
        embeddings = np.ctypeslib.as_array(out, shape=(n_tokens * n_embd,)).reshape(n_tokens, n_embd).copy()
        return LlamaCppImage(embeddings, runs[0], runs)
    finally:
        if chunks:
            mtmd.mtmd_input_chunks_free(chunks)
        if bitmap:
            mtmd.mtmd_bitmap_free(bitmap)
        if ctx:
            mtmd.mtmd_free(ctx)
        llama_cpp.llama_model_free(model)


def quiet_logs(mtmd, verbose: bool) -> None:
    """Route llama.cpp's and mtmd's logs through llama-cpp-python's logger (errors only unless verbose)."""
    from llama_cpp._logger import llama_log_callback, set_verbose

    set_verbose(verbose)
    mtmd.mtmd_log_set(llama_log_callback, None)


def image_chunk(mtmd, chunks):
    for i in range(mtmd.mtmd_input_chunks_size(chunks)):
        chunk = mtmd.mtmd_input_chunks_get(chunks, i)
        if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE:
            return chunk
    raise RuntimeError("mtmd produced no image chunk")
