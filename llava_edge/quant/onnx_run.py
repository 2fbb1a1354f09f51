"""Running a vision graph on ONNX Runtime and measuring its embeddings against the reference's.

Shared by export (the fp32 graph's parity, the optional fused graph) and quant (the precision guard);
the bundle's graph names are the contract's: pixel_values -> image_embeds.
"""

from __future__ import annotations

import os

import numpy as np

from ..onnx_session import ort_session

INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_embeds"
IMAGE_TOKENS_NAME = "image_tokens"  # int64 scalar input, default (its initializer): every token
PATCHES_NAME = "image_token_patches"  # int64 [batch, tokens] output: the patch each token stands for, -1 = CLS


def cpu_session(path: str | os.PathLike, threads: int | None = None, low_memory: bool = False):
    """A CPU session for measuring. threads None: $OMP_NUM_THREADS if set, else ORT's default.
    low_memory for one-off runs (see onnx_session)."""
    if threads is None:
        threads = int(os.environ.get("OMP_NUM_THREADS") or 0)
    # quiet: ORT warns on every load that the image_tokens input has an initializer (its default, on purpose)
    return ort_session(path, threads, low_memory=low_memory, quiet=True)


def run_onnx(path_or_session, pixel_values, threads: int | None = None, image_tokens: int | None = None) -> np.ndarray:
    """image_embeds for pixel_values [n, 3, S, S] (numpy or a CPU torch tensor); image_tokens None: the
    graph's default (every token)."""
    return run_onnx_tokens(path_or_session, pixel_values, threads, image_tokens, [OUTPUT_NAME])[0]


def run_onnx_tokens(path_or_session, pixel_values, threads=None, image_tokens=None, outputs=(OUTPUT_NAME, PATCHES_NAME)):
    """The graph's outputs (default: image_embeds and image_token_patches) for pixel_values at image_tokens."""
    session = path_or_session if hasattr(path_or_session, "run") else cpu_session(path_or_session, threads)
    feeds = {INPUT_NAME: np.ascontiguousarray(pixel_values, dtype=np.float32)}
    if image_tokens is not None:
        feeds[IMAGE_TOKENS_NAME] = np.array(image_tokens, dtype=np.int64)
    return session.run(list(outputs), feeds)


def embeddings_agreement(got: np.ndarray, expected: np.ndarray) -> dict:
    """cosine_min: the lowest cosine between matching token vectors; max_abs: the largest |difference|."""
    got = np.asarray(got, dtype=np.float64).reshape(-1, expected.shape[-1])
    expected = np.asarray(expected, dtype=np.float64).reshape(-1, expected.shape[-1])
    if got.shape != expected.shape:
        raise ValueError(f"embedding shapes differ: {got.shape} vs {expected.shape}")
    norms = np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1)
    cosine = (got * expected).sum(axis=1) / np.maximum(norms, 1e-30)
    return {"cosine_min": float(cosine.min()), "max_abs": float(np.abs(got - expected).max())}


def reference_embeddings(model, pixel_values, image_tokens: int | None = None) -> np.ndarray:
    """The PyTorch reference's image tokens (`Llava.encode_images`) for pixel_values, as float32 numpy.
    model is passed in by export: quant itself never imports the reference."""
    import torch

    pixels = torch.as_tensor(np.asarray(pixel_values, dtype=np.float32))
    with torch.no_grad():
        return model.encode_images(pixels, image_tokens).float().numpy()
