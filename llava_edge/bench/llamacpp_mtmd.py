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


def llamacpp_image_embeddings(
    mmproj_path: str | os.PathLike,
    text_model_path: str | os.PathLike,
    rgb: np.ndarray,
    threads: int | None = None,
    verbose: bool = False,
) -> LlamaCppImage:
    """One RGB uint8 image [H, W, 3] through llama.cpp's mtmd (its own preprocessing, CLIP graph and projector)."""
    encoder = MtmdImageEncoder(mmproj_path, text_model_path, rgb, threads, verbose)
    try:
        ms = encoder.encode()
        return LlamaCppImage(encoder.embeddings(), ms)
    finally:
        encoder.close()


class MtmdImageEncoder:
    """mtmd loaded once with one image tokenized; `encode()` runs CLIP + projector again (bench times it)."""

    def __init__(self, mmproj_path, text_model_path, rgb: np.ndarray, threads: int | None = None, verbose: bool = False):
        import llama_cpp
        import llama_cpp.mtmd_cpp as mtmd

        self._llama, self._mtmd = llama_cpp, mtmd
        self.rgb = np.ascontiguousarray(rgb, dtype=np.uint8)  # mtmd's bitmap points into it
        if self.rgb.ndim != 3 or self.rgb.shape[2] != 3:
            raise ValueError(f"expected an RGB image [H, W, 3], got shape {rgb.shape}")
        threads = threads or int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
        quiet_logs(mtmd, verbose)
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(str(text_model_path).encode(), model_params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load the text model {text_model_path}")
        self.ctx = self.bitmap = self.chunks = None
        try:
            params = mtmd.mtmd_context_params_default()
            params.use_gpu = False
            params.n_threads = threads
            params.print_timings = False
            params.warmup = False
            self.ctx = mtmd.mtmd_init_from_file(str(mmproj_path).encode(), self.model, params)
            if not self.ctx:
                raise RuntimeError(f"llama.cpp's mtmd could not load the mmproj {mmproj_path}")
            height, width = self.rgb.shape[:2]
            self.bitmap = mtmd.mtmd_bitmap_init(width, height, self.rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
            self.chunks = mtmd.mtmd_input_chunks_init()
            marker = mtmd.mtmd_default_marker()
            text = mtmd.mtmd_input_text(marker, len(marker), False, True)
            bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(self.bitmap)
            if mtmd.mtmd_tokenize(self.ctx, self.chunks, ctypes.byref(text), bitmaps, 1) != 0:
                raise RuntimeError("mtmd_tokenize failed")
            self.chunk = image_chunk(mtmd, self.chunks)
            self.n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(self.chunk)
        except BaseException:
            self.close()
            raise

    def encode(self) -> float:
        """Encode the image once; milliseconds taken."""
        start = time.perf_counter()
        if self._mtmd.mtmd_encode_chunk(self.ctx, self.chunk) != 0:
            raise RuntimeError("mtmd_encode_chunk failed")
        return (time.perf_counter() - start) * 1000

    def embeddings(self) -> np.ndarray:
        """[n_image_tokens, n_embd] of the last encode."""
        n_embd = self._llama.llama_model_n_embd(self.model)
        out = self._mtmd.mtmd_get_output_embd(self.ctx)
        return np.ctypeslib.as_array(out, shape=(self.n_tokens * n_embd,)).reshape(self.n_tokens, n_embd).copy()

    def close(self) -> None:
        mtmd = self._mtmd
        if self.chunks:
            mtmd.mtmd_input_chunks_free(self.chunks)
        if self.bitmap:
            mtmd.mtmd_bitmap_free(self.bitmap)
        if self.ctx:
            mtmd.mtmd_free(self.ctx)
        if self.model:
            self._llama.llama_model_free(self.model)
        self.chunks = self.bitmap = self.ctx = self.model = None


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
