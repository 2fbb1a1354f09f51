"""Tiny random LLaVA-1.5 checkpoints in the exact real formats, written by transformers or by hand.

transformers (the oracle) writes the llava-hf ones; the liuhaotian layout (LLaVA's
LlavaLlamaForCausalLM + a separate CLIP dir) is written here from the same weights, without any
llava_edge code, so that loading it is checked against an independent source.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

IMAGE_TOKEN = 300  # llava-hf's <image> id in the tiny vocab


def make_hf_model(
    image_size=28,
    kv_heads=2,
    feature_layer=-2,
    strategy="default",
    rope_theta=10000.0,
    tied=False,
    seed=0,
    vocab_size=320,
) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        image_size=image_size, patch_size=14, projection_dim=16,
    )
    text = LlamaConfig(
        vocab_size=vocab_size, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=kv_heads, rope_theta=rope_theta,
        tie_word_embeddings=tied, max_position_embeddings=256,
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN,
        vision_feature_layer=feature_layer, vision_feature_select_strategy=strategy,
        tie_word_embeddings=tied,
    )
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # init weights are tiny; larger ones make logit differences visible
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.copy_(torch.randn_like(p) * 0.15)
    return model


def n_image_tokens(model: LlavaForConditionalGeneration) -> int:
    v = model.config.vision_config
    return (v.image_size // v.patch_size) ** 2 + (model.config.vision_feature_select_strategy == "full")


def hf_ids(ids: list[int], model) -> torch.Tensor:
    """Expand each single image placeholder into the n_image_tokens run llava-hf expects."""
    out = []
    for i in ids:
        out += [IMAGE_TOKEN] * n_image_tokens(model) if i == IMAGE_TOKEN else [i]
    return torch.tensor([out])


def text_and_vision_state(model) -> tuple[dict, dict, dict, dict]:
    """(language model.* tensors, lm_head, projector linears, CLIP vision_model.* tensors) by HF names."""
    sd = model.state_dict()
    lang, head, proj, vision = {}, {}, {}, {}
    for k, v in sd.items():
        if k.startswith("model.language_model."):
            lang[k[len("model.language_model."):]] = v
        elif k == "lm_head.weight":
            head[k] = v
        elif k.startswith("model.multi_modal_projector."):
            proj[k[len("model.multi_modal_projector."):]] = v
        elif k.startswith("model.vision_tower."):
            rest = k[len("model.vision_tower."):]
            vision[rest if rest.startswith("vision_model.") else "vision_model." + rest] = v
    return lang, head, proj, vision


def save_hf_layout(model, out: Path, layout: str) -> Path:
    """llava-hf on disk: 'save_pretrained' (transformers itself), 'sharded' (small shards + index),
    'in_memory' (the newer model.* names), or 'vision_model' (the older vision_tower.vision_model.*)."""
    out.mkdir(parents=True, exist_ok=True)
    if layout == "save_pretrained":
        model.save_pretrained(out)
        return out
    if layout == "sharded":
        model.save_pretrained(out, max_shard_size="100KB")
        assert (out / "model.safetensors.index.json").exists()
        return out
    model.config.save_pretrained(out)
    lang, head, proj, vision = text_and_vision_state(model)
    if layout == "in_memory":
        tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    elif layout == "vision_model":
        tensors = {f"language_model.model.{k}": v for k, v in lang.items()}
        tensors.update({f"language_model.{k}": v for k, v in head.items()})
        tensors.update({f"multi_modal_projector.{k}": v for k, v in proj.items()})
        tensors.update({f"vision_tower.{k}": v for k, v in vision.items()})
    else:
        raise ValueError(layout)
    if model.config.tie_word_embeddings:
        tensors = {k: v for k, v in tensors.items() if not k.endswith("lm_head.weight")}
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))
    return out


def save_full_clip(model, out: Path) -> Path:
    """A full CLIPModel dir (vision + text towers) holding the LLaVA model's vision weights."""
    v = model.config.vision_config
    clip = CLIPModel(CLIPConfig(
        vision_config=v.to_dict(),
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=99, max_position_embeddings=16),
        projection_dim=16,
    ))
    _, _, _, vision = text_and_vision_state(model)
    missing, unexpected = clip.load_state_dict(vision, strict=False)
    assert not unexpected and all(not k.startswith("vision_model.") for k in missing)
    clip.save_pretrained(out)
    return out


def save_liuhaotian_layout(model, out: Path, clip_name: str, n_shards: int = 2, fmt: str = "bin") -> Path:
    """LLaVA's own LlavaLlamaForCausalLM layout: LLaMA config + mm_* keys, model.* / lm_head /
    model.mm_projector.{0,2} tensors in sharded .bin (or .safetensors) files with an index, plus the
    rotary inv_freq buffers that older LLaMA checkpoints carry."""
    out.mkdir(parents=True, exist_ok=True)
    c, t, v = model.config, model.config.text_config, model.config.vision_config
    config = {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
        "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads, "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_parameters["rope_theta"], "rope_scaling": None, "hidden_act": "silu",
        "max_position_embeddings": t.max_position_embeddings, "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float32",
        "mm_vision_tower": clip_name, "mm_hidden_size": v.hidden_size, "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": c.vision_feature_layer,
        "mm_vision_select_feature": "patch" if c.vision_feature_select_strategy == "default" else "cls_patch",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "image_aspect_ratio": "pad",
        "tune_mm_mlp_adapter": False, "use_cache": True,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    lang, head, proj, _ = text_and_vision_state(model)
    tensors = {f"model.{k}": v for k, v in lang.items()}
    if not c.tie_word_embeddings:
        tensors.update(head)
    for k, v in proj.items():  # linear_1 -> mm_projector.0, linear_2 -> mm_projector.2
        idx, param = k.split(".")[0], k.split(".")[1]
        tensors[f"model.mm_projector.{2 * (int(idx[-1]) - 1)}.{param}"] = v
    head_dim = t.hidden_size // t.num_attention_heads
    for i in range(t.num_hidden_layers):
        tensors[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = 1.0 / (
            10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    names = sorted(tensors)
    ext = "bin" if fmt == "bin" else "safetensors"
    weight_map = {}
    for s in range(n_shards):
        shard = f"pytorch_model-{s + 1:05d}-of-{n_shards:05d}.{ext}" if fmt == "bin" else \
            f"model-{s + 1:05d}-of-{n_shards:05d}.{ext}"
        part = {k: tensors[k].clone().contiguous() for k in names[s::n_shards]}
        if fmt == "bin":
            torch.save(part, out / shard)
        else:
            save_file(part, str(out / shard))
        weight_map.update({k: shard for k in part})
    index = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    (out / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


def make_llava(vocab_size: int, image_token: int, pad_id: int | None, seed: int, image_size: int = 56) -> LlavaForConditionalGeneration:
    """A tiny LLaVA whose text dims suit llama.cpp's kernels (K-quants need rows of 256)."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=image_size, patch_size=14, projection_dim=16)
    text = LlamaConfig(vocab_size=vocab_size, hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=pad_id)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # logits with std ~8 (visible differences), attention not saturated
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(torch.randn_like(p) * 0.5)
            else:
                p.copy_(torch.randn_like(p) * 0.03)
    return model


def make_liuhaotian_checkpoint(root: Path, seed: int, fmt: str = "bin", n_shards: int = 2) -> Path:
    """A tiny random LLaVA saved as liuhaotian does (CLIP tower in clip/), with a trained SentencePiece model."""
    from spm_fixture import train_tiny_spm

    (root / "spm").mkdir(parents=True, exist_ok=True)
    tok = train_tiny_spm(root / "spm", 400)
    model = make_llava(400, 32000, None, seed=seed)
    path = save_liuhaotian_layout(model, root / "llava-tiny", "clip", n_shards=n_shards, fmt=fmt)
    save_full_clip(model, path / "clip")
    (path / "tokenizer.model").write_bytes(tok.read_bytes())
    return path
