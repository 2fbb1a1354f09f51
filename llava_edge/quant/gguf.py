"""GGUF quantization with llama.cpp's own quantizer (`llama_model_quantize`, through llama-cpp-python).

Only llama.cpp implements the K-quants (gguf-py's numpy quantizers stop at Q4_0/Q8_0), and using its
quantizer keeps the per-tensor type choices of Q4_K_M (some tensors at Q6_K) exactly as stock llama.cpp.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
import time
from pathlib import Path

import llama_cpp

from ..errors import UserError
from ..quiet import GGML_LOG_ERROR, FallbackTally, restore_llama_log

QUANT_FTYPES = {
    "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    "Q5_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "F16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
    "F32": llama_cpp.LLAMA_FTYPE_ALL_F32,
}
DEFAULT_QUANT = "Q4_K_M"
_TENSOR_LINE = re.compile(rb"\[\s*(\d+)/\s*(\d+)\]")  # llama.cpp logs "[  12/ 201] blk.1.attn_q.weight ..."


def check_quant(quant: str) -> str:
    """The canonical quant name, or a UserError naming the accepted ones."""
    name = str(quant).upper()
    if name not in QUANT_FTYPES:
        raise UserError(f"unknown quantization {quant!r} (choose one of {', '.join(QUANT_FTYPES)})")
    return name


def quantize_gguf(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    quant: str = DEFAULT_QUANT,
    n_threads: int | None = None,
    progress: bool = True,
) -> Path:
    """Quantize an F32/F16 GGUF into `dst` (written to a temp name, then renamed)."""
    name = check_quant(quant)
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise UserError(f"{src}: GGUF to quantize not found")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANT_FTYPES[name]
    params.nthread = n_threads if n_threads else max(1, os.cpu_count() or 1)
    tmp = dst.with_name(dst.name + ".tmp")
    start = time.perf_counter()
    with _quantizer_log(f"quantize {name}" if progress else None) as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if progress and log.fallbacks.line(name):
        print(log.fallbacks.line(name), file=sys.stderr)
    if rc != 0:
        tmp.unlink(missing_ok=True)
        raise UserError(f"{src}: llama.cpp could not quantize it to {name} (code {rc})")
    tmp.replace(dst)
    if progress:
        mib, seconds = dst.stat().st_size / 2**20, time.perf_counter() - start
        print(f"quantized {src.name} -> {dst.name} ({name}, {mib:.1f} MiB) in {seconds:.1f} s", file=sys.stderr)
    return dst


class _quantizer_log:
    """While the quantizer runs: its per-tensor log lines feed a progress bar (or nothing), its errors
    go to stderr. The process's log callback (llava_edge.quiet's or llama-cpp-python's) is put back afterwards.
    """

    def __init__(self, desc: str | None):
        self.desc, self.bar, self.fallbacks = desc, None, FallbackTally()

    def __enter__(self):
        @llama_cpp.llama_log_callback
        def on_log(level, text, user_data):
            self.fallbacks.note(text)
            if level == GGML_LOG_ERROR:
                print((text or b"").decode("utf-8", "replace"), end="", file=sys.stderr)
            m = _TENSOR_LINE.search(text or b"")
            if m and self.desc is not None:
                done, total = int(m[1]), int(m[2])
                if self.bar is None:
                    from tqdm import tqdm

                    self.bar = tqdm(total=total, desc=self.desc, unit="tensor", file=sys.stderr, leave=False)
                self.bar.update(done - self.bar.n)

        self._callback = on_log  # keep the ctypes thunk alive while C holds it
        llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc):
        restore_llama_log()
        if self.bar is not None:
            self.bar.close()
        return False
