"""The same vision weights as a llama.cpp "mmproj" GGUF (CLIP + LLaVA MLP projector), for interop.

Stock llama.cpp (llama-mtmd-cli, llama-cpp-python's Llava15ChatHandler) loads it. Key and tensor names
are llama.cpp's (tools/mtmd/clip-impl.h; gguf-py's Keys.Clip*/MODEL_TENSOR.V_*).

`clip.vision.feature_layer` makes llama.cpp run exactly the layers up to the selected one: its indices
are hidden-state indices (0 = the embeddings after pre-LayerNorm, i = after block i), as ours. Only
those blocks are written and block_count says so. Without the key llama.cpp runs n_layer - 1 blocks,
one too few for a LLaVA-1.5 tower that was cut at layer -2.

llama.cpp's graph is not the reference: it concatenates CLS after the patches (so position rows meet
different tokens), and its projector GELU is the tanh approximation. Its image tokens therefore differ
from ours; tests and bench measure by how much, they do not assume equality.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFWriter, LlamaFileType

from ..architectures import LlavaConfig
from ..errors import UserError
from ..reference.llava import Llava

FTYPES = {"f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16}


def write_mmproj(model: Llava, cfg: LlavaConfig, out_path: str | os.PathLike, ftype: str = "f16") -> Path:
    """Write the CLIP tower (up to the selected layer) + MLP projector as a llama.cpp mmproj GGUF."""
    if ftype not in FTYPES:
        raise ValueError(f"mmproj ftype must be one of {', '.join(FTYPES)}, not {ftype!r}")
    check_expressible(cfg)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    n_blocks = max(cfg.feature_layers)
    tensors = list(mmproj_tensors(model, n_blocks))

    writer = GGUFWriter(str(out_path), "clip")
    write_metadata(writer, cfg, n_blocks, ftype)
    for name, tensor in tensors:
        dtype = storage_dtype(tensor, ftype)
        writer.add_tensor_info(name, tuple(tensor.shape), dtype, tensor.numel() * dtype.itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, tensor in tensors:  # one at a time: never a second full copy of the weights
        writer.write_tensor_data(tensor.detach().to(torch.float32).numpy().astype(storage_dtype(tensor, ftype)))
    writer.close()
    return out_path


def check_expressible(cfg: LlavaConfig) -> None:
    """llama.cpp's LLaVA graph can express LLaVA-1.5's vision path, not every variant our reference runs.

    A property of the user's checkpoint, so a UserError; `export --mmproj` checks it before any work."""
    if cfg.keeps_cls:
        raise UserError("llama.cpp's LLaVA graph drops CLS; a checkpoint that keeps it (full/cls_patch) has no mmproj form")
    if cfg.projector.num_linears != 2 or not cfg.projector.bias:
        raise UserError(f"llama.cpp's 'mlp' projector is Linear-GELU-Linear with biases, not {cfg.projector.type!r}")
    if cfg.feature_layers != sorted(set(cfg.feature_layers)):
        raise ValueError("llama.cpp stacks feature layers in increasing order; this checkpoint lists them otherwise")
    if cfg.vision.hidden_act not in ("quick_gelu", "gelu"):
        raise ValueError(f"unsupported CLIP activation {cfg.vision.hidden_act!r} for llama.cpp")


def write_metadata(writer: GGUFWriter, cfg: LlavaConfig, n_blocks: int, ftype: str) -> None:
    v = cfg.vision
    writer.add_name("llava-edge mmproj")
    writer.add_description("CLIP vision tower + LLaVA MLP projector, written by llava-edge")
    writer.add_file_type(FTYPES[ftype])
    writer.add_clip_has_vision_encoder(True)
    writer.add_bool("clip.has_text_encoder", False)
    writer.add_bool("clip.has_llava_projector", True)
    writer.add_clip_projector_type("mlp")
    writer.add_vision_image_size(v.image_size)
    writer.add_vision_patch_size(v.patch_size)
    writer.add_vision_embedding_length(v.hidden_size)
    writer.add_vision_feed_forward_length(v.intermediate_size)
    writer.add_vision_projection_dim(cfg.projector.out_features)
    writer.add_vision_block_count(n_blocks)
    writer.add_vision_head_count(v.num_attention_heads)
    writer.add_vision_attention_layernorm_eps(v.layer_norm_eps)
    writer.add_vision_image_mean([float(x) for x in cfg.image_mean])
    writer.add_vision_image_std([float(x) for x in cfg.image_std])
    writer.add_vision_use_gelu(v.hidden_act == "gelu")  # false: CLIP's quick_gelu
    writer.add_array("clip.vision.feature_layer", [int(i) for i in cfg.feature_layers])
    writer.add_string("clip.vision.mm_patch_merge_type", "flat")


def mmproj_tensors(model: Llava, n_blocks: int):
    """(llama.cpp name, tensor) in file order. CLIP's post_layernorm is not written: LLaVA never uses it."""
    vis = model.vision
    yield "v.patch_embd.weight", vis.embeddings.patch_embedding.weight
    yield "v.class_embd", vis.embeddings.class_embedding
    yield "v.position_embd.weight", vis.embeddings.position_embedding.weight
    yield "v.pre_ln.weight", vis.pre_layrnorm.weight
    yield "v.pre_ln.bias", vis.pre_layrnorm.bias
    parts = {
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_out": "self_attn.out_proj", "ln1": "layer_norm1", "ln2": "layer_norm2",
        "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2",
    }
    for i, layer in enumerate(vis.encoder.layers[:n_blocks]):
        for ours, theirs in parts.items():
            module = layer.get_submodule(theirs)
            yield f"v.blk.{i}.{ours}.weight", module.weight
            yield f"v.blk.{i}.{ours}.bias", module.bias
    for index, linear in zip((0, 2), model.projector.linears):  # LLaVA's mm_projector Sequential indices
        yield f"mm.{index}.weight", linear.weight
        yield f"mm.{index}.bias", linear.bias


def storage_dtype(tensor: torch.Tensor, ftype: str) -> np.dtype:
    """f16 for matrices and the conv kernel, f32 for vectors (biases, norms, CLS), as llama.cpp's converter."""
    return np.dtype(np.float16) if ftype == "f16" and tensor.dim() >= 2 else np.dtype(np.float32)
