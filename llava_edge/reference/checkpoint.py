"""Load LLaVA-1.5 checkpoints (llava-hf and liuhaotian layouts) into the reference model.

Tensors are read one at a time (tensor_files.py) straight into a model built on the meta device, so loading
never holds two copies of the weights. Names are found with hf_cache.py; the savers of the same layouts are in
checkpoint_writer.py.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..architectures import LlavaConfig, config_from_liuhaotian, config_from_llava_hf, is_liuhaotian, is_llava_hf, read_json
from ..errors import CheckpointError
from .hf_cache import DEFAULT_CLIP, resolve_checkpoint
from .llava import Llava
from .tensor_files import TensorFile, iter_tensors, load_bin, weight_files


# ----------------------------------------------------------------------------- key mapping

_DROP = re.compile(r"(rotary_emb\.inv_freq|position_ids)$")


def map_llava_hf_key(key: str) -> str | None:
    if _DROP.search(key):
        return None
    m = re.match(r"^(?:model\.)?multi_modal_projector\.linear_(\d+)\.(weight|bias)$", key)
    if m:
        return f"projector.linears.{int(m[1]) - 1}.{m[2]}"
    for prefix in ("model.vision_tower.vision_model.", "model.vision_tower.", "vision_tower.vision_model.", "vision_tower."):
        if key.startswith(prefix):
            return "vision." + key[len(prefix):]
    for prefix in ("language_model.model.", "model.language_model.", "language_model."):
        if key.startswith(prefix):
            rest = key[len(prefix):]
            return "language." + rest
    if key == "lm_head.weight":
        return "language.lm_head.weight"
    return key  # unknown: reported as unexpected


def map_liuhaotian_key(key: str) -> str | None:
    if _DROP.search(key):
        return None
    m = re.match(r"^model\.mm_projector\.(?:(\d+)\.)?(weight|bias)$", key)
    if m:
        return f"projector.linears.{int(m[1] or 0) // 2}.{m[2]}"
    m = re.match(r"^model\.vision_tower\.vision_tower\.vision_model\.(.*)$", key)
    if m:
        return "vision." + m[1]
    if key.startswith("model."):
        return "language." + key[len("model."):]
    if key == "lm_head.weight":
        return "language.lm_head.weight"
    return key


def map_clip_key(key: str) -> str | None:
    if key.startswith("vision_model."):
        return None if _DROP.search(key) else "vision." + key[len("vision_model."):]
    return None  # text tower, projections and logit scale belong to CLIP's contrastive head


# ----------------------------------------------------------------------------- loading


@dataclass
class LoadedCheckpoint:
    model: Llava
    config: LlavaConfig
    path: Path
    tokenizer_path: Path | None
    vision_tower_path: Path | None


def read_llava_config(ckpt: Path, vision_tower: str | os.PathLike | None = None) -> tuple[LlavaConfig, Path | None]:
    """(config, CLIP dir for liuhaotian checkpoints or None)."""
    raw = read_json(ckpt / "config.json")
    preprocessor = _optional_json(ckpt / "preprocessor_config.json")
    if is_llava_hf(raw):
        return config_from_llava_hf(raw, preprocessor), None
    if is_liuhaotian(raw):
        clip_dir = find_vision_tower(ckpt, raw, vision_tower)
        clip_pre = _optional_json(clip_dir / "preprocessor_config.json") or preprocessor
        return config_from_liuhaotian(raw, read_json(clip_dir / "config.json"), clip_pre), clip_dir
    arch = raw.get("architectures") or raw.get("model_type") or "none"
    raise CheckpointError(
        f"{ckpt / 'config.json'}: unknown checkpoint format (architectures {arch}); "
        "expected LlavaForConditionalGeneration (llava-hf) or LlavaLlamaForCausalLM (liuhaotian)"
    )


def find_vision_tower(ckpt: Path, raw: dict, vision_tower: str | os.PathLike | None) -> Path:
    if vision_tower is not None:
        return resolve_checkpoint(vision_tower, "vision tower")
    if (ckpt / "clip" / "config.json").exists():
        return ckpt / "clip"
    name = raw.get("mm_vision_tower") or DEFAULT_CLIP
    if (ckpt / name / "config.json").exists():
        return ckpt / name
    return resolve_checkpoint(
        name, "vision tower", hint=f"huggingface-cli download {name} (or pass --vision-tower DIR)"
    )


def _optional_json(path: Path) -> dict | None:
    return read_json(path) if path.exists() else None


def read_tensors(ckpt: Path, cfg: LlavaConfig, clip_dir: Path | None, expected: dict, materialize: bool, dtype=None):
    """Map the checkpoint's tensors onto the reference model's names, checking names and shapes.

    Returns name -> tensor (materialize) or name -> shape. Raises CheckpointError naming the file.
    """
    found: dict = {}

    def take(files: list[Path], mapper):
        for key, path, tf in iter_tensors(files):
            name = mapper(key)
            if name is None:
                continue
            if name not in expected:
                raise CheckpointError(f"{path}: unexpected tensor {key!r} for this config")
            shape = tf.shape(key)
            if shape != tuple(expected[name].shape):
                raise CheckpointError(
                    f"{path}: tensor {key!r} has shape {shape}, config.json implies {tuple(expected[name].shape)}"
                )
            if materialize:
                tensor = tf.get(key)
                found[name] = tensor if dtype is None else tensor.to(dtype)
            else:
                found[name] = shape

    if cfg.format == "llava-hf":
        take(weight_files(ckpt), map_llava_hf_key)
    else:
        take(weight_files(clip_dir), map_clip_key)
        take(weight_files(ckpt), map_liuhaotian_key)  # a fine-tuned tower saved inside wins over clip_dir

    if cfg.text.tie_word_embeddings:
        found.pop("language.lm_head.weight", None)
    missing = [k for k in expected if k not in found and not (cfg.text.tie_word_embeddings and k == "language.lm_head.weight")]
    if missing:
        where = f"{ckpt}" + (f" and {clip_dir}" if clip_dir else "")
        raise CheckpointError(f"{where}: {len(missing)} tensors missing, e.g. {', '.join(missing[:3])}")
    return found


def meta_model(cfg: LlavaConfig) -> Llava:
    with torch.device("meta"):
        return Llava(cfg)


def load_checkpoint(
    name: str | os.PathLike,
    vision_tower: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
) -> LoadedCheckpoint:
    """Load a llava-hf or liuhaotian checkpoint (a dir or a name in the local HF cache)."""
    ckpt = resolve_checkpoint(name)
    cfg, clip_dir = read_llava_config(ckpt, vision_tower)
    model = meta_model(cfg)
    tensors = read_tensors(ckpt, cfg, clip_dir, model.state_dict(), materialize=True, dtype=dtype)
    model.load_state_dict(tensors, strict=False, assign=True)
    if cfg.text.tie_word_embeddings:
        model.language.lm_head.weight = model.language.embed_tokens.weight
    model.eval()
    tokenizer = ckpt / "tokenizer.model"
    return LoadedCheckpoint(model, cfg, ckpt, tokenizer if tokenizer.exists() else None, clip_dir)


def assemble_llava(
    llm: str | os.PathLike,
    vision_tower: str | os.PathLike,
    projector: str | os.PathLike | None = None,
    projector_type: str = "mlp2x_gelu",
    feature_layer: int = -2,
    select_feature: str = "patch",
    aspect: str = "pad",
) -> tuple[Llava, LlavaConfig]:
    """A LLaVA model from its parts, as training starts: an LLM dir, a CLIP dir and optionally a
    stage-1 projector (`mm_projector.bin`); without one the projector keeps its random init."""
    llm_dir = resolve_checkpoint(llm, "language model")
    clip_dir = resolve_checkpoint(vision_tower, "vision tower")
    llm_raw = read_json(llm_dir / "config.json")
    raw = {
        **llm_raw,
        "mm_vision_tower": str(clip_dir),
        "mm_projector_type": projector_type,
        "mm_vision_select_layer": feature_layer,
        "mm_vision_select_feature": select_feature,
        "image_aspect_ratio": aspect,
    }
    clip_pre = _optional_json(clip_dir / "preprocessor_config.json")
    cfg = config_from_liuhaotian(raw, read_json(clip_dir / "config.json"), clip_pre)
    model = Llava(cfg)  # real init: the projector starts from nn.Linear's default init, as in LLaVA
    expected = model.state_dict()
    found: dict[str, torch.Tensor] = {}
    for files, mapper in ((weight_files(clip_dir), map_clip_key), (weight_files(llm_dir), map_liuhaotian_key)):
        for key, path, tf in iter_tensors(files):
            name = mapper(key)
            if name is None:
                continue
            if name not in expected or tf.shape(key) != tuple(expected[name].shape):
                raise CheckpointError(f"{path}: tensor {key!r} does not fit the assembled model")
            found[name] = tf.get(key)
    if projector is not None:
        state = load_bin(Path(projector)) if str(projector).endswith(".bin") else dict(_st_items(Path(projector)))
        for key, tensor in state.items():
            name = map_liuhaotian_key(key)
            if name not in expected or not name.startswith("projector."):
                raise CheckpointError(f"{projector}: unexpected tensor {key!r} in a projector file")
            found[name] = tensor
    needed = [k for k in expected if not k.startswith("projector.") or projector is not None]
    if cfg.text.tie_word_embeddings:
        needed = [k for k in needed if k != "language.lm_head.weight"]
    missing = [k for k in needed if k not in found]
    if missing:
        raise CheckpointError(f"{llm_dir} / {clip_dir}: {len(missing)} tensors missing, e.g. {', '.join(missing[:3])}")
    model.load_state_dict(found, strict=False)
    return model, cfg


def _st_items(path: Path):
    tf = TensorFile(path)
    for key in tf.keys():
        yield key, tf.get(key)
