"""Config dataclasses for the three parts of LLaVA, read from either checkpoint format.

llava-hf keeps everything in one config.json (`text_config`, `vision_config`); liuhaotian's
`LlavaLlamaForCausalLM` is a LLaMA config plus `mm_*` keys, and its CLIP tower lives in a
separate directory with its own config.json (a full `CLIPConfig` or a `CLIPVisionConfig`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .conversation import IMAGE_TOKEN_INDEX
from .errors import CheckpointError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIP's pixel normalization (image.py's defaults too)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class ProjectorConfig:
    type: str = "mlp2x_gelu"  # "linear" or "mlp{N}x_gelu", as LLaVA's mm_projector_type
    in_features: int = 1024
    out_features: int = 4096
    bias: bool = True

    @property
    def num_linears(self) -> int:
        if self.type == "linear":
            return 1
        if self.type.startswith("mlp") and self.type.endswith("x_gelu"):
            return int(self.type[3:-6])
        raise CheckpointError(f"unsupported projector type {self.type!r} (expected linear or mlpNx_gelu)")


@dataclass
class TextConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    pad_token_id: int | None = 0

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads


@dataclass
class LlavaConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # Which CLIP hidden state feeds the projector: an index into (embeddings, layer 1, ..., layer L),
    # negative from the end, or a list whose states are concatenated on the feature axis.
    feature_layer: int | list[int] = -2
    select_feature: str = "patch"  # patch/default drop CLS; cls_patch/full keep it
    image_token_index: int = IMAGE_TOKEN_INDEX  # the id that marks an image in input_ids
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    aspect: str = "pad"  # "pad" = LLaVA expand2square before CLIP preprocessing; "square" = crop only
    template: str = "vicuna_v1"
    format: str = "llava-hf"  # the checkpoint format it was read from

    @property
    def keeps_cls(self) -> bool:
        return self.select_feature in ("cls_patch", "full")

    @property
    def n_image_tokens(self) -> int:
        return self.vision.num_patches + (1 if self.keeps_cls else 0)

    @property
    def feature_layers(self) -> list[int]:
        layers = self.feature_layer if isinstance(self.feature_layer, list) else [self.feature_layer]
        n = self.vision.num_hidden_layers
        return [layer if layer >= 0 else n + 1 + layer for layer in layers]

    def to_dict(self) -> dict:
        return asdict(self)


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _pick(raw: dict, cls, renames: dict | None = None):
    """Build dataclass `cls` from the keys of `raw` it knows (optionally renamed), defaults elsewhere."""
    renames = renames or {}
    names = set(cls.__dataclass_fields__)
    kwargs = {}
    for key, value in raw.items():
        key = renames.get(key, key)
        if key in names and value is not None:
            kwargs[key] = value
    return cls(**kwargs)


def text_config_from_dict(raw: dict) -> TextConfig:
    raw = dict(raw)
    rope = raw.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in raw:
        raw["rope_theta"] = rope["rope_theta"]
    scaling = raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise CheckpointError(f"unsupported RoPE type {rope_type!r}: only the default LLaMA RoPE is implemented")
    if raw.get("model_type", "llama") not in ("llama", "llava", "llava_llama"):
        raise CheckpointError(f"unsupported language model type {raw.get('model_type')!r} (expected llama)")
    cfg = _pick(raw, TextConfig)
    if "num_key_value_heads" not in raw or raw["num_key_value_heads"] is None:
        cfg.num_key_value_heads = cfg.num_attention_heads
    for key in ("bos_token_id", "eos_token_id"):
        if isinstance(getattr(cfg, key), list):
            setattr(cfg, key, getattr(cfg, key)[0])
    return cfg


def vision_config_from_dict(raw: dict) -> VisionConfig:
    if raw.get("model_type") == "clip" or "vision_config" in raw:
        raw = raw.get("vision_config") or {}
    if raw.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise CheckpointError(f"unsupported vision tower type {raw.get('model_type')!r} (expected CLIP)")
    return _pick(raw, VisionConfig)


def image_settings(preprocessor: dict | None) -> dict:
    """mean, std and image size from a preprocessor_config.json (CLIPImageProcessor), if there is one."""
    if not preprocessor:
        return {}
    out = {}
    if preprocessor.get("image_mean"):
        out["image_mean"] = tuple(preprocessor["image_mean"])
    if preprocessor.get("image_std"):
        out["image_std"] = tuple(preprocessor["image_std"])
    return out


def config_from_llava_hf(raw: dict, preprocessor: dict | None = None) -> LlavaConfig:
    vision = vision_config_from_dict(raw.get("vision_config") or {})
    text = text_config_from_dict(raw.get("text_config") or {})
    if raw.get("projector_hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"unsupported projector activation {raw['projector_hidden_act']!r} (expected gelu)")
    feature_layer = raw.get("vision_feature_layer", -2)
    strategy = raw.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise CheckpointError(f"unsupported vision_feature_select_strategy {strategy!r}")
    n_layers = len(feature_layer) if isinstance(feature_layer, list) else 1
    projector = ProjectorConfig(
        type="mlp2x_gelu",
        in_features=vision.hidden_size * n_layers,
        out_features=text.hidden_size,
        bias=raw.get("multimodal_projector_bias", True),
    )
    do_pad = bool((preprocessor or {}).get("do_pad", False))
    return LlavaConfig(
        vision=vision,
        projector=projector,
        text=text,
        feature_layer=feature_layer,
        select_feature="patch" if strategy == "default" else "cls_patch",
        image_token_index=raw.get("image_token_index", raw.get("image_token_id", 32000)),
        aspect="pad" if do_pad else "square",
        template="llava_hf",
        format="llava-hf",
        **image_settings(preprocessor),
    )


def config_from_liuhaotian(raw: dict, clip_raw: dict, preprocessor: dict | None = None) -> LlavaConfig:
    text = text_config_from_dict({**raw, "model_type": "llama"})
    vision = vision_config_from_dict(clip_raw)
    select_feature = raw.get("mm_vision_select_feature", "patch")
    if select_feature not in ("patch", "cls_patch"):
        raise CheckpointError(f"unsupported mm_vision_select_feature {select_feature!r}")
    if raw.get("mm_use_im_start_end"):
        raise CheckpointError("checkpoints with mm_use_im_start_end=true are not supported (LLaVA-1.5 does not use them)")
    mm_hidden = raw.get("mm_hidden_size", vision.hidden_size)
    if mm_hidden != vision.hidden_size:
        raise CheckpointError(
            f"mm_hidden_size {mm_hidden} does not match the CLIP tower's hidden_size {vision.hidden_size}"
        )
    projector = ProjectorConfig(
        type=raw.get("mm_projector_type", "linear"), in_features=mm_hidden, out_features=text.hidden_size
    )
    projector.num_linears  # validates the type early
    aspect = raw.get("image_aspect_ratio", "square")
    return LlavaConfig(
        vision=vision,
        projector=projector,
        text=text,
        feature_layer=raw.get("mm_vision_select_layer", -2),
        select_feature=select_feature,
        image_token_index=IMAGE_TOKEN_INDEX,
        aspect="pad" if aspect == "pad" else "square",
        template="vicuna_v1",
        format="liuhaotian",
        **image_settings(preprocessor),
    )


def is_liuhaotian(raw: dict) -> bool:
    return "mm_vision_tower" in raw or "mm_projector_type" in raw or "LlavaLlamaForCausalLM" in raw.get("architectures", [])


def is_llava_hf(raw: dict) -> bool:
    return "text_config" in raw and "vision_config" in raw
