"""fp16 and int8 variants of the vision graph, and the accuracy guard that picks the bundle's precision.

`auto` keeps int8 only where its embeddings hold cosine >= 0.999 against the reference on calibration
images, else fp32 (docs/design.md, "Edge bundle"). Random weights quantize well; real CLIP weights have
activation outliers, so the guard measures instead of assuming.

int8 is dynamic (weights int8 per output channel, activations quantized per tensor at run time): on
ViT-L/14-336 with random weights 0.93 s vs 3.28 s fp32 per image (1 thread), cosine 0.99972 on photos.
Static QDQ with MinMax calibration was slower on CPU (1.83 vs 1.71 s, same contended run) at a lower
cosine (0.99921) and took 99 s and 8.8 GB to calibrate, so it is offered (`quantize_int8_static`) but
`auto` does not use it. fp16 is for GPU providers: on CPU it is slower than fp32 (3.67 s).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx

from .onnx_files import release_freed_memory, save_onnx
from .onnx_run import INPUT_NAME, cpu_session, embeddings_agreement, reference_embeddings, run_onnx

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "int8")
INT8_MIN_COSINE = 0.999  # docs/design.md, "Edge bundle": auto keeps int8 only at or above this


class VisionPrecision(NamedTuple):
    path: Path
    precision: str  # "fp32" | "fp16" | "int8"
    cosine: float  # min over tokens of the cosine vs the reference on the calibration pixels


def variant_path(fp32_path: Path, precision: str) -> Path:
    return fp32_path.with_name(f"{fp32_path.stem}.{precision}{fp32_path.suffix}")


def convert_fp16(fp32_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """Weights and compute in fp16; input and output stay float32 (the bundle's contract).

    ONNX shape inference is skipped: it copies the model several times (6.2 GB peak for ViT-L) and
    the conversion does not need it for this graph (parity is measured on the result).
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True, disable_shape_infer=True)
    save_onnx(proto, Path(out_path))
    del proto
    release_freed_memory()
    return Path(out_path)


def quantize_int8_dynamic(fp32_path: str | os.PathLike, out_path: str | os.PathLike) -> Path:
    """int8 weights per output channel; activations quantized at run time (no calibration needed).

    A plain graph goes through the streamed quantizer (the weights once: 0.6 GB peak for ViT-L instead of
    ORT's 4.2 GB, same graph and outputs); one with ORT's fused Attention nodes through quantize_dynamic."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from .onnx_int8_streamed import graph_op_types, quantize_int8_streamed

    if "Attention" not in graph_op_types(fp32_path):
        quantize_int8_streamed(fp32_path, out_path)
        release_freed_memory()
        return Path(out_path)
    quantize_dynamic(
        str(fp32_path), str(out_path), per_channel=True, weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Attention"], use_external_data_format=_needs_external(fp32_path),
        # ONNX shape inference stops at the fused com.microsoft nodes; everything untyped is float
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    release_freed_memory()
    return Path(out_path)


def quantize_int8_static(fp32_path: str | os.PathLike, out_path: str | os.PathLike, calib_pixels) -> Path:
    """QDQ int8 with MinMax ranges from calib_pixels [n, 3, S, S] (one image per calibration step)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rows = iter(np.asarray(calib_pixels, dtype=np.float32))

        def get_next(self):
            row = next(self.rows, None)
            return None if row is None else {INPUT_NAME: row[None]}

    quantize_static(
        str(fp32_path), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"],
        use_external_data_format=_needs_external(fp32_path),
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return Path(out_path)


def _needs_external(path) -> bool:
    return Path(str(path) + ".data").exists()


def choose_precision(
    fp32_path: str | os.PathLike,
    calib_pixels,
    model=None,
    requested: str = "auto",
    threads: int | None = None,
) -> VisionPrecision:
    """The vision graph the bundle ships, its precision and its cosine vs the reference on calib_pixels.

    model: the PyTorch reference (`Llava`); None compares against the fp32 graph instead.
    Variants are written next to fp32_path as `<stem>.fp16.onnx` / `<stem>.int8.onnx`; a rejected
    int8 file is removed.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"vision precision must be one of {', '.join(PRECISIONS)}, not {requested!r}")
    fp32_path = Path(fp32_path)
    calib = np.asarray(calib_pixels, dtype=np.float32)

    def embeddings(path: Path) -> np.ndarray:
        return run_onnx(cpu_session(path, threads, low_memory=True), calib)

    expected = reference_embeddings(model, calib) if model is not None else embeddings(fp32_path)

    def cosine_of(path: Path) -> float:
        return embeddings_agreement(embeddings(path), expected)["cosine_min"]

    if requested == "fp32":
        return VisionPrecision(fp32_path, "fp32", cosine_of(fp32_path))
    if requested == "fp16":
        path = convert_fp16(fp32_path, variant_path(fp32_path, "fp16"))
        return VisionPrecision(path, "fp16", cosine_of(path))
    int8 = quantize_int8_dynamic(fp32_path, variant_path(fp32_path, "int8"))
    int8_cosine = cosine_of(int8)
    if requested == "int8":
        return VisionPrecision(int8, "int8", int8_cosine)
    if int8_cosine >= INT8_MIN_COSINE:
        log.info("vision int8 kept: cosine %.6f >= %.3f vs the reference", int8_cosine, INT8_MIN_COSINE)
        return VisionPrecision(int8, "int8", int8_cosine)
    log.info("vision int8 rejected: cosine %.6f < %.3f; keeping fp32", int8_cosine, INT8_MIN_COSINE)
    int8.unlink()
    Path(str(int8) + ".data").unlink(missing_ok=True)
    return VisionPrecision(fp32_path, "fp32", cosine_of(fp32_path))
