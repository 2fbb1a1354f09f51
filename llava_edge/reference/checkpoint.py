"""Load LLaVA-1.5 checkpoints (llava-hf and liuhaotian layouts) into the reference model; save ours.

Tensors are read one at a time (safetensors or memory-mapped torch zip files) straight into a model
built on the meta device, so loading never holds two copies of the weights. `.bin` files are only
ever opened with `torch.load(weights_only=True)`.

Over 400 lines on purpose: reading and writing both layouts are one set of facts (key names, config keys,
where the CLIP tower and tokenizer live); the savers below are the exact inverses of the key maps above,
and keeping them side by side is what keeps the two directions in step.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..config import (
    CLIP_MEAN,
    CLIP_STD,
    LlavaConfig,
    VisionConfig,
    config_from_liuhaotian,
    config_from_llava_hf,
    is_liuhaotian,
    is_llava_hf,
    read_json,
)
from ..errors import CheckpointError
from .llava import Llava
from .vision import VisionTransformer

DEFAULT_CLIP = "openai/clip-vit-large-patch14-336"


# ----------------------------------------------------------------------------- finding checkpoints


def hf_cache_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    return list(dict.fromkeys(dirs))


def find_in_hf_cache(name: str) -> Path | None:
    """Newest snapshot of `org/name` or of any `*/name` in the local Hugging Face cache."""
    pattern = "models--" + name.replace("/", "--") if "/" in name else f"models--*--{name}"
    snapshots = []
    for cache in hf_cache_dirs():
        for repo in cache.glob(pattern):
            snapshots += [p for p in (repo / "snapshots").glob("*") if (p / "config.json").exists()]
    return max(snapshots, key=lambda p: p.stat().st_mtime) if snapshots else None


def resolve_checkpoint(name: str | os.PathLike, what: str = "checkpoint", hint: str = "") -> Path:
    """A local directory, else a snapshot in the local Hugging Face cache. Never the network."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: a {what} must be a directory, not a file")
    found = find_in_hf_cache(str(name))
    if found is not None:
        return found
    looked = ", ".join([str(path.resolve())] + [str(d) for d in hf_cache_dirs()])
    get = hint or download_hint(str(name))
    raise CheckpointError(f"{what} {str(name)!r} not found (looked in {looked}); get it with: {get}")


KNOWN_REPOS = {
    "llava-v1.5-7b": "liuhaotian/llava-v1.5-7b",
    "llava-v1.5-13b": "liuhaotian/llava-v1.5-13b",
    "llava-1.5-7b-hf": "llava-hf/llava-1.5-7b-hf",
    "llava-1.5-13b-hf": "llava-hf/llava-1.5-13b-hf",
}


def download_hint(name: str) -> str:
    repo = KNOWN_REPOS.get(name, name)
    hint = f"huggingface-cli download {repo}"
    if repo.startswith("liuhaotian/"):  # its CLIP tower is a separate download
        hint += f" and huggingface-cli download {DEFAULT_CLIP}"
    return hint


# ----------------------------------------------------------------------------- reading tensors


class TensorFile:
    """One weights file: names without loading, tensors one at a time."""

    def __init__(self, path: Path):
        self.path = path
        if path.suffix == ".safetensors":
            try:
                self._st = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
            self._bin = None
        else:
            self._st = None
            self._bin = load_bin(path)

    def keys(self) -> list[str]:
        return list(self._st.keys()) if self._st is not None else list(self._bin)

    def get(self, key: str) -> torch.Tensor:
        return self._st.get_tensor(key) if self._st is not None else self._bin[key]

    def shape(self, key: str) -> tuple[int, ...]:
        if self._st is not None:
            return tuple(self._st.get_slice(key).get_shape())
        return tuple(self._bin[key].shape)


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        mmap = zipfile.is_zipfile(path)  # legacy (non-zip) torch files cannot be memory-mapped
        with warnings.catch_warnings():  # the unpickler warns about protocols before refusing the file
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a plain tensor checkpoint ({first_line})") from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__} with other values")
    return obj


def weight_files(ckpt: Path) -> list[Path]:
    """The weights files of a checkpoint dir: a sharded index wins over single files."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = ckpt / index_name
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no weight_map")
            files = [ckpt / name for name in dict.fromkeys(weight_map.values())]
            for f in files:
                if not f.exists():
                    raise CheckpointError(f"{f}: shard listed in {index.name} is missing")
            return files
    singles = sorted(ckpt.glob("*.safetensors")) or sorted(ckpt.glob("pytorch_model*.bin"))
    if not singles:
        raise CheckpointError(f"{ckpt}: no weights found (*.safetensors, pytorch_model*.bin or an index)")
    return singles


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, Path, TensorFile]]:
    for path in files:
        tf = TensorFile(path)
        for key in tf.keys():
            yield key, path, tf


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


# ----------------------------------------------------------------------------- saving


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


# ----------------------------------------------------------------------------- parts for training


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


def save_projector(model: Llava, path: Path) -> None:
    """Stage-1 output: the projector alone, under LLaVA's `model.mm_projector.*` names."""
    tmp = Path(path).with_suffix(".tmp")
    torch.save({k: v.detach().clone() for k, v in projector_state_liuhaotian(model).items()}, tmp)
    tmp.replace(path)
