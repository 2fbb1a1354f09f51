"""The vision half of the edge bundle as one ONNX graph: CLIP up to the selected layer + the projector.

    pixel_values float32 [batch, 3, S, S], image_tokens int64 scalar K (optional: default every token)
      ->  image_embeds float32 [batch, K, n_embd], image_token_patches int64 [batch, K]

K < n_image_tokens asks for token reduction (reference/token_reduction.py), computed in the graph from the
feature layer's own attention, before the projector; the default is the graph's initializer for that input,
n_image_tokens, so a caller that feeds only pixel_values gets what graphs before token reduction gave.

The graph is traced by torch (dynamo exporter by default) and holds standard ONNX ops only, so every
execution provider (CPU, CUDA, TensorRT) can take all of it. ONNX Runtime fuses LayerNorm/GELU/MatMul
patterns itself when a session is created.

`fuse=True` also applies ONNX Runtime's offline transformer fusions (com.microsoft Attention,
SkipLayerNormalization, QuickGelu, BiasGelu), kept only when the fused graph holds parity with the
reference. It is off by default: on ViT-L/14-336 (experiments/vision_export_measure.py, uncontended 16-core
Xeon, runs interleaved) fp32 fused 3.38 s vs plain 3.28 s per image at 1 thread, 0.41 vs 0.42 s at 16,
and int8 quantized from the fused graph is slower at 1 thread (QAttention: 1.06 s vs 0.93 s). Whether
fused Attention pays on a GPU provider was not measured.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..quant.onnx_files import move_model, release_freed_memory, save_onnx, write_single_file
from ..quant.onnx_run import (
    IMAGE_TOKENS_NAME, INPUT_NAME, OUTPUT_NAME, PATCHES_NAME, cpu_session, embeddings_agreement, reference_embeddings,
    run_onnx, run_onnx_tokens,
)
from ..reference.llava import Llava
from .onnx_token_reduction import cls_probe, reduce_static
FUSED_MIN_COSINE = 0.99999  # the fp32 fidelity bound (docs/design.md, "Fidelity")


class ImageEncoder(nn.Module):
    """What vision.onnx computes, sharing the reference model's parameters.

    Runs only the CLIP layers up to the deepest selected one. Attention is written out instead of
    calling scaled_dot_product_attention so that the exported graph has the MatMul/Softmax pattern that
    ONNX Runtime's CLIP attention fusion matches; parity with the reference is measured, not assumed.

    image_tokens (int64 scalar, K) is `Llava.reduced_image_tokens`' budget: K >= n_image_tokens is every
    token; fewer are chosen by token reduction on the deepest selected layer (onnx_token_reduction.py).
    The graph also returns, for each token, the patch it stands for (-1: CLS).
    """

    def __init__(self, model: Llava):
        super().__init__()
        self.cfg = model.cfg
        self.embeddings = model.vision.embeddings
        self.pre_layrnorm = model.vision.pre_layrnorm
        self.layers = nn.ModuleList(model.vision.encoder.layers[: max(model.cfg.feature_layers)])
        self.projector = model.projector

    def forward(self, pixel_values: torch.Tensor, image_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        states = [x]
        for i, layer in enumerate(self.layers, start=1):
            if i == len(self.layers):  # the deepest selected layer: what reduction reads
                y, probe = _attention(layer.self_attn, layer.layer_norm1(x), probe=True)
            else:
                y = _attention(layer.self_attn, layer.layer_norm1(x))
            x = x + y
            x = x + layer.mlp(layer.layer_norm2(x))
            states.append(x)
        picked = [states[i] for i in self.cfg.feature_layers]
        n_cls = int(self.cfg.keeps_cls)
        budget = torch.clamp(image_tokens.reshape(()), 0, self.cfg.n_image_tokens)
        rows, patches = reduce_static(torch.cat([s[:, 1:] for s in picked], dim=-1), *probe, budget - n_cls)
        if n_cls:
            rows = torch.cat([torch.cat([s[:, :1] for s in picked], dim=-1), rows], dim=1)
            patches = torch.cat([torch.full_like(patches[:, :1], -1), patches], dim=1)
        keep = torch.arange(budget)
        return self.projector(torch.index_select(rows, 1, keep)), torch.index_select(patches, 1, keep)


def _attention(attn, x: torch.Tensor, probe: bool = False):
    """The layer's attention on x; probe: also what token reduction reads (onnx_token_reduction.cls_probe)."""
    B, T, D = x.shape
    h = attn.n_heads
    hd = D // h
    q = attn.q_proj(x).view(B, T, h, hd).transpose(1, 2)
    k = attn.k_proj(x).view(B, T, h, hd).permute(0, 2, 3, 1)  # K^T in one Transpose, as the fusion expects
    v = attn.v_proj(x).view(B, T, h, hd).transpose(1, 2)
    weights = F.softmax((q @ k) * hd**-0.5, dim=-1)
    out = attn.out_proj((weights @ v).transpose(1, 2).reshape(B, T, D))
    return (out, cls_probe(q, k, hd)) if probe else out


@dataclass
class VisionExport:
    path: Path
    exporter: str  # "dynamo" | "torchscript"
    fused: bool  # the ORT-fused graph was kept
    fused_cosine: float | None  # fused graph vs the reference on a probe image (None: fusion not tried)


EXPORTERS = ("dynamo", "torchscript")


def export_vision_onnx(
    model: Llava, out_path: str | os.PathLike, opset: int = 18, fuse: bool = False, exporter: str = "dynamo"
) -> Path:
    """Write the vision graph to out_path (plus `<name>.data` only when over 2 GB); return out_path."""
    return export_vision_onnx_report(model, out_path, opset, fuse, exporter).path


def export_vision_onnx_report(
    model: Llava, out_path: str | os.PathLike, opset: int = 18, fuse: bool = False, exporter: str = "dynamo"
) -> VisionExport:
    """Export, optionally fuse (kept only at cosine >= 0.99999 vs the reference), check with onnx.checker.

    exporter "dynamo" (torch.export; needs onnxscript) streams the weights to disk: ViT-L exports at
    about 4 GB peak RSS (1.5 GB of it the torch model) against 5.3 GB for the legacy "torchscript" exporter,
    which torch deprecates but which exports a tiny model in 0.1 s instead of 4 s (the tests use it).
    opset 18 is dynamo's own; asking it for 17 runs a whole-model version conversion.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {', '.join(EXPORTERS)}, not {exporter!r}")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    v = model.cfg.vision
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".onnx-export-") as tmp:
        plain_dir, fused_dir = Path(tmp) / "plain", Path(tmp) / "fused"
        plain_dir.mkdir()
        fused_dir.mkdir()
        encoder = float32_encoder(model)
        trace_to_onnx(encoder, v.image_size, plain_dir / out_path.name, opset, exporter)
        del encoder
        chosen, fused_ok, cosine = plain_dir, False, None
        if fuse:
            fuse_graph(plain_dir / out_path.name, fused_dir / out_path.name, v.num_attention_heads, v.hidden_size)
            release_freed_memory()
            probe = np.random.default_rng(0).standard_normal((1, 3, v.image_size, v.image_size)).astype(np.float32)
            got = run_onnx(cpu_session(fused_dir / out_path.name, low_memory=True), probe)
            cosine = embeddings_agreement(got, reference_embeddings(model, probe))["cosine_min"]
            if cosine >= FUSED_MIN_COSINE:
                chosen, fused_ok = fused_dir, True
        move_model(chosen, out_path)
    release_freed_memory()
    onnx.checker.check_model(str(out_path))  # path-based: works with external data too
    return VisionExport(out_path, exporter, fused_ok, cosine)


def float32_encoder(model: Llava) -> ImageEncoder:
    encoder = ImageEncoder(model).eval()
    if any(p.dtype != torch.float32 for p in encoder.parameters()):
        encoder = copy.deepcopy(encoder).float()  # copies the vision layers only, not the decoder
    return encoder


def trace_to_onnx(encoder: ImageEncoder, image_size: int, path: Path, opset: int, exporter: str) -> None:
    """Export with a dynamic batch and token count. dynamo writes the weights to `<name>.data`: it then never
    holds a serialized copy of the model (1.7 GB peak for ViT-L instead of 5.2 GB)."""
    example = torch.zeros(2, 3, image_size, image_size)  # batch 2: torch.export would specialise a batch of 1
    budget = torch.tensor(encoder.cfg.n_image_tokens // 2)
    names = dict(input_names=[INPUT_NAME, IMAGE_TOKENS_NAME], output_names=[OUTPUT_NAME, PATCHES_NAME])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # "legacy TorchScript-based exporter"
        warnings.simplefilter("ignore", FutureWarning)
        if exporter == "dynamo":
            logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)  # "no torchvision"
            torch.onnx.export(
                encoder, (example, budget), str(path), dynamo=True, **names, opset_version=opset,
                dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch")}, "image_tokens": None},
                external_data=True, verbose=False,
            )
        else:
            torch.onnx.export(
                encoder, (example, budget), str(path), dynamo=False, **names, opset_version=opset,
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch", 1: "tokens"},
                              PATCHES_NAME: {0: "batch", 1: "tokens"}},
                do_constant_folding=True,
            )
    default_all_tokens(path, encoder.cfg.n_image_tokens)


def default_all_tokens(path: Path, n_image_tokens: int) -> None:
    """Give the image_tokens input an initializer (ONNX's default for an input; a caller's value overrides it):
    a run that feeds only pixel_values gets every token, as graphs from before token reduction did."""
    external = Path(str(path) + ".data").exists()
    proto = onnx.load(str(path), load_external_data=False)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(np.array(n_image_tokens, np.int64), IMAGE_TOKENS_NAME))
    if external:  # the weights stay where they are; the graph that names them is small
        onnx.save(proto, str(path))
    else:
        write_single_file(proto, path)


def fuse_graph(src: Path, dst: Path, num_heads: int, hidden_size: int) -> None:
    """ONNX Runtime's offline transformer fusions for CLIP; portable (no hardware-specific layout passes).

    Symbolic shape inference is off: it copies the whole model several times (10 GB peak for ViT-L)
    and the CLIP fusions do not need it.
    """
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions

    options = FusionOptions("clip")
    options.enable_shape_inference = False
    fused = optimizer.optimize_model(
        str(src), model_type="clip", num_heads=num_heads, hidden_size=hidden_size, opt_level=0,
        optimization_options=options,
    ).model
    declare_used_domains(fused)
    save_onnx(fused, dst)


def declare_used_domains(proto: onnx.ModelProto) -> None:
    """The optimizer adds com.microsoft nodes without importing the domain; onnx.checker requires it."""
    declared = {o.domain for o in proto.opset_import}
    for domain in sorted({n.domain for n in proto.graph.node} - declared - {"", "ai.onnx"}):
        proto.opset_import.append(onnx.helper.make_opsetid(domain, 1))


# ----------------------------------------------------------------------------- parity


def vision_parity(onnx_path: str | os.PathLike, model: Llava, pixel_values, threads: int | None = None) -> dict:
    """The ONNX graph vs the PyTorch reference (`model.encode_images`) on the same pixels."""
    got = run_onnx(cpu_session(onnx_path, threads, low_memory=True), pixel_values)
    return embeddings_agreement(got, reference_embeddings(model, pixel_values))


def parity_budgets(n_image_tokens: int, minimum: int = 1) -> list[int]:
    """The K at which export measures token reduction: about 1/2, 1/4 and 1/9 of the tokens (64 of 576)."""
    return sorted({min(n_image_tokens - 1, max(minimum, n_image_tokens // d)) for d in (2, 4, 9)})


def reduction_parity(onnx_path, model: Llava, pixel_values, budgets: list[int], threads: int | None = None) -> dict:
    """Per K (as a string): patches_equal, the share of images whose tokens stand for the reference's patches;
    cosine_min and max_abs vs `model.reduced_image_tokens` over every token, and cosine_min_same_patches over
    the images with equal patches only (None if none): a patch chosen differently makes a low cosine."""
    session = cpu_session(onnx_path, threads, low_memory=True)
    pixels = torch.as_tensor(np.asarray(pixel_values, dtype=np.float32))
    out = {}
    for k in budgets:
        got, got_patches = run_onnx_tokens(session, pixels.numpy(), image_tokens=k)
        with torch.no_grad():
            want, want_patches = model.reduced_image_tokens(pixels, k)
        want = want.float().numpy()
        same = [bool(np.array_equal(g, w)) for g, w in zip(got_patches, want_patches.numpy())]
        same_cosine = embeddings_agreement(got[same], want[same])["cosine_min"] if any(same) else None
        out[str(k)] = {"patches_equal": sum(same) / len(same), **embeddings_agreement(got, want),
                       "cosine_min_same_patches": same_cosine}
    return out
