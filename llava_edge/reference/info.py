"""`llava-edge info`: what a checkpoint is. Reads configs and tensor shapes, not the weights."""

from __future__ import annotations

import math

from .checkpoint import meta_model, read_llava_config, read_tensors
from .hf_cache import resolve_checkpoint


def tokenizer_vocab(path) -> int | None:
    if not path.exists():
        return None
    try:
        import sentencepiece as spm
    except ImportError:
        return None
    return spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()


def checkpoint_info(name, vision_tower=None) -> dict:
    ckpt = resolve_checkpoint(name)
    cfg, clip_dir = read_llava_config(ckpt, vision_tower)
    shapes = read_tensors(ckpt, cfg, clip_dir, meta_model(cfg).state_dict(), materialize=False)
    params = {part: 0 for part in ("vision", "projector", "language")}
    for tensor_name, shape in shapes.items():
        params[tensor_name.split(".")[0]] += math.prod(shape)
    params["total"] = sum(params.values())
    v, t = cfg.vision, cfg.text
    return {
        "path": str(ckpt),
        "format": cfg.format,
        "vision_tower": str(clip_dir) if clip_dir else "inside the checkpoint",
        "vision": f"CLIP ViT {v.num_hidden_layers}L d{v.hidden_size} h{v.num_attention_heads} patch {v.patch_size}",
        "image_size": v.image_size,
        "n_image_tokens": cfg.n_image_tokens,
        "feature_layer": cfg.feature_layer,
        "select_feature": cfg.select_feature,
        "aspect": cfg.aspect,
        "projector": f"{cfg.projector.type} {cfg.projector.in_features} -> {cfg.projector.out_features}",
        "text": (
            f"LLaMA {t.num_hidden_layers}L d{t.hidden_size} ffn{t.intermediate_size} "
            f"h{t.num_attention_heads} kv{t.num_key_value_heads} rope_theta {t.rope_theta:g}"
        ),
        "vocab_size": t.vocab_size,
        "tokenizer_vocab": tokenizer_vocab(ckpt / "tokenizer.model"),
        "template": cfg.template,
        "params": params,
    }


def human_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def format_info(summary: dict) -> str:
    lines = []
    for key, value in summary.items():
        if key == "params":
            value = ", ".join(f"{part} {human_count(n)}" for part, n in value.items())
        lines.append(f"{key:16} {value}")
    return "\n".join(lines)
