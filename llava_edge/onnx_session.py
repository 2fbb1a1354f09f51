"""The one place an ONNX Runtime session is made (runtime, export's parity checks, quant's guard, bench).

A leaf: no torch. What differs between callers is explicit:
- threads: intra-op threads; None or 0 leaves ONNX Runtime's own default;
- lean: one image at a time next to llama.cpp: no memory arena or memory patterns (they only add peak RSS:
  -90 MB at ViT-L, same latency), no pre-packed weight copies (-150 MB anonymous at ViT-L int8 for +0.13 s per
  image on a 2-core Xeon: under 1 % of a 7B first answer, and room on an 8 GB board), and idle ORT threads must
  not spin while llama.cpp decodes on the same cores;
- low_memory: one-off parity runs: no pre-packed weight copies and no memory arena (slower runs);
- quiet: ORT logs errors only (else warnings too, its default).
"""

from __future__ import annotations

import os


def ort_session(
    model: str | os.PathLike | bytes,
    threads: int | None = None,
    providers: list[str] | None = None,
    lean: bool = False,
    low_memory: bool = False,
    quiet: bool = False,
):
    """An `onnxruntime.InferenceSession` on a graph file (or serialized bytes), all graph optimizations on,
    on `providers` (default: CPU only)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if quiet:
        options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if lean:
        options.enable_cpu_mem_arena = False
        options.enable_mem_pattern = False
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if lean or low_memory:
        options.add_session_config_entry("session.disable_prepacking", "1")
        options.enable_cpu_mem_arena = False
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=providers or ["CPUExecutionProvider"])
