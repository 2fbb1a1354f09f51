"""Save models in the layouts `checkpoint.py` reads: the liuhaotian LLaVA dir (CLIP tower in `clip/`), a CLIP
vision dir, a LLaMA dir and a stage-1 projector file.

The tensor names written here are the inverses of checkpoint.py's key maps (`map_liuhaotian_key`,
`map_clip_key`); tests/test_checkpoint.py and the training tests load what these write.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..architectures import CLIP_MEAN, CLIP_STD, LlavaConfig, VisionConfig
from .llava import Llava
from .clip_vision import VisionTransformer


def clip_vision_config_dict(v: VisionConfig) -> dict:
    return {
        "architectures": ["CLIPVisionModel"],
        "model_type": "clip_vision_model",
        "hidden_size": v.hidden_size,
        "intermediate_size": v.intermediate_size,
        "num_hidden_layers": v.num_hidden_layers,
        "num_attention_heads": v.num_attention_heads,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "num_channels": v.num_channels,
        "layer_norm_eps": v.layer_norm_eps,
        "hidden_act": v.hidden_act,
    }


def preprocessor_config_dict(image_size: int, mean, std) -> dict:
    s = image_size
    return {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": s},
        "do_center_crop": True,
        "crop_size": {"height": s, "width": s},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(mean),
        "image_std": list(std),
        "do_convert_rgb": True,
        "resample": 3,
    }


def save_clip_vision(
    vision: VisionTransformer, out_dir: Path, mean=CLIP_MEAN, std=CLIP_STD, dtype: torch.dtype | None = None
) -> None:
    """A vision tower as a transformers CLIPVisionModel directory (+ its preprocessor config)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {"vision_model." + k: v for k, v in vision.state_dict().items()}
    _save_safetensors(tensors, out_dir / "model.safetensors", dtype)
    (out_dir / "config.json").write_text(json.dumps(clip_vision_config_dict(vision.cfg), indent=2))
    pre = preprocessor_config_dict(vision.cfg.image_size, mean, std)
    (out_dir / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))


def liuhaotian_config_dict(cfg: LlavaConfig, vision_tower: str) -> dict:
    return {
        **llama_config_dict(cfg),
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava",
        "mm_vision_tower": vision_tower,
        "mm_hidden_size": cfg.projector.in_features,
        "mm_projector_type": cfg.projector.type,
        "mm_vision_select_layer": cfg.feature_layer,
        "mm_vision_select_feature": cfg.select_feature,
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": cfg.aspect,
    }


def projector_state_liuhaotian(model: Llava) -> dict[str, torch.Tensor]:
    """Projector weights under LLaVA's `model.mm_projector.{0,2,...}` names (GELU sits at odd indices)."""
    out = {}
    for i, linear in enumerate(model.projector.linears):
        prefix = "model.mm_projector." if model.cfg.projector.type == "linear" else f"model.mm_projector.{2 * i}."
        for name, t in linear.state_dict().items():
            out[prefix + name] = t
    return out


def save_liuhaotian(
    model: Llava, out_dir: Path, tokenizer_path: Path | None = None, dtype: torch.dtype | None = None
) -> None:
    """An `LlavaLlamaForCausalLM` directory with its CLIP tower in `clip/` (the demo checkpoint layout)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {"model." + k: v for k, v in model.language.state_dict().items() if not k.startswith("lm_head.")}
    if not model.cfg.text.tie_word_embeddings:
        tensors["lm_head.weight"] = model.language.lm_head.weight
    tensors.update(projector_state_liuhaotian(model))
    _save_safetensors(tensors, out_dir / "model.safetensors", dtype)
    (out_dir / "config.json").write_text(json.dumps(liuhaotian_config_dict(model.cfg, "clip"), indent=2))
    save_clip_vision(model.vision, out_dir / "clip", model.cfg.image_mean, model.cfg.image_std, dtype)
    if tokenizer_path is not None:
        (out_dir / "tokenizer.model").write_bytes(Path(tokenizer_path).read_bytes())


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, dtype: torch.dtype | None) -> None:
    out = {}
    for k, v in tensors.items():
        v = v.detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out[k] = v.contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(out, str(tmp), metadata={"format": "pt"})
    tmp.replace(path)


def llama_config_dict(cfg: LlavaConfig) -> dict:
    t = cfg.text
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size,
        "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_hidden_layers,
        "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads,
        "hidden_act": "silu",
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "max_position_embeddings": t.max_position_embeddings,
        "tie_word_embeddings": t.tie_word_embeddings,
        "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id,
        "pad_token_id": t.pad_token_id,
    }


def save_llama(language: torch.nn.Module, text_cfg, out_dir: Path, tokenizer_path: Path | None = None) -> None:
    """A language model alone as a transformers LlamaForCausalLM directory (the "Vicuna" of a world)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {"model." + k: v for k, v in language.state_dict().items() if not k.startswith("lm_head.")}
    if not text_cfg.tie_word_embeddings:
        tensors["lm_head.weight"] = language.lm_head.weight
    _save_safetensors(tensors, out_dir / "model.safetensors", None)
    (out_dir / "config.json").write_text(json.dumps(llama_config_dict(LlavaConfig(text=text_cfg)), indent=2))
    if tokenizer_path is not None:
        (out_dir / "tokenizer.model").write_bytes(Path(tokenizer_path).read_bytes())


def save_projector(model: Llava, path: Path) -> None:
    """Stage-1 output: the projector alone, under LLaVA's `model.mm_projector.*` names."""
    tmp = Path(path).with_suffix(".tmp")
    torch.save({k: v.detach().clone() for k, v in projector_state_liuhaotian(model).items()}, tmp)
    tmp.replace(path)
