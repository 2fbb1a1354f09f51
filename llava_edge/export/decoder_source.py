"""Where the decoder's weights come from when writing a GGUF: a model in memory, or checkpoint files read
one tensor at a time.

A `DecoderSource` names each weight by the reference model's name (`embed_tokens.weight`,
`layers.0.self_attn.q_proj.weight`, ..., `lm_head.weight`) and loads it on demand as a numpy array, so
the writer holds one tensor at a time. Safetensors files are read with plain file reads rather than a
memory map: mapped pages would stay resident and make peak RSS grow to the size of the file.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..architectures import (
    TextConfig,
    is_liuhaotian,
    is_llava_hf,
    read_json,
    text_config_from_dict,
)
from ..errors import CheckpointError
from .gguf_vocab import AddedToken, added_tokens_from_dir, llava_hf_added_tokens

Loader = Callable[[], np.ndarray]


@dataclass
class DecoderSource:
    text: TextConfig
    tokenizer_path: Path
    template: str | None  # a conversation template name, written as the GGUF's chat template
    weights: dict[str, Loader]  # reference name -> loader of that tensor
    added_tokens: list[AddedToken] = field(default_factory=list)
    name: str = "llava-edge decoder"


def expected_shapes(text: TextConfig) -> dict[str, tuple[int, ...]]:
    """Every weight of the reference LLaMA with its shape (out, in), in the order they are written."""
    d, f, hd = text.hidden_size, text.intermediate_size, text.head_dim
    q, kv = text.num_attention_heads * hd, text.num_key_value_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (text.vocab_size, d)}
    for i in range(text.num_hidden_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, q),
            p + "post_attention_layernorm.weight": (d,),
            p + "mlp.gate_proj.weight": (f, d),
            p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
        })
    shapes["norm.weight"] = (d,)
    if not text.tie_word_embeddings:
        shapes["lm_head.weight"] = (text.vocab_size, d)
    return shapes


def source_from_model(
    language, text: TextConfig, tokenizer_path: Path, template: str | None,
    added_tokens: list[AddedToken] | None = None,
) -> DecoderSource:
    """From the reference `Llama` in memory (`Llava.language`)."""
    params = dict(language.named_parameters())

    def loader(name: str) -> Loader:
        return lambda: params[name].detach().cpu().float().numpy()

    weights = {name: loader(name) for name in expected_shapes(text) if name in params}
    return DecoderSource(text, Path(tokenizer_path), template, weights, list(added_tokens or []))


def source_from_loaded(loaded) -> DecoderSource:
    """From a `reference.checkpoint.LoadedCheckpoint`."""
    if loaded.tokenizer_path is None:
        raise CheckpointError(f"{loaded.path}: no tokenizer.model next to the checkpoint")
    cfg = loaded.config
    return source_from_model(
        loaded.model.language, cfg.text, loaded.tokenizer_path, cfg.template,
        _added_tokens(Path(loaded.path), cfg.format, cfg.image_token_index, cfg.text.pad_token_id),
    )


def source_from_checkpoint(ckpt: Path) -> DecoderSource:
    """Straight from a checkpoint directory (llava-hf, liuhaotian or plain LLaMA), tensors read lazily."""
    from ..reference.checkpoint import map_liuhaotian_key, map_llava_hf_key
    from ..reference.tensor_files import weight_files

    ckpt = Path(ckpt)
    raw = read_json(ckpt / "config.json")
    if is_llava_hf(raw):
        text = text_config_from_dict(raw["text_config"])
        mapper, fmt, template = map_llava_hf_key, "llava-hf", "llava_hf"
        image_token = raw.get("image_token_index", raw.get("image_token_id", 32000))
        pad_id = raw["pad_token_id"] if raw.get("pad_token_id") is not None else text.pad_token_id
        text.pad_token_id = pad_id  # llava-hf keeps <pad> in the top-level config, not in text_config
    else:
        text = text_config_from_dict({**raw, "model_type": "llama"})
        mapper, fmt, image_token, pad_id = map_liuhaotian_key, "liuhaotian", None, text.pad_token_id
        template = "vicuna_v1" if is_liuhaotian(raw) else None
    tokenizer = ckpt / "tokenizer.model"
    if not tokenizer.is_file():
        raise CheckpointError(f"{ckpt}: no tokenizer.model (the SentencePiece model the GGUF vocab is built from)")

    shapes = expected_shapes(text)
    weights: dict[str, Loader] = {}
    for path in weight_files(ckpt):
        for key, loader, shape in _lazy_tensors(path):
            name = mapper(key)
            if name is None or not name.startswith("language."):
                continue
            name = name[len("language."):]
            if name not in shapes:
                if name == "lm_head.weight" and text.tie_word_embeddings:
                    continue
                raise CheckpointError(f"{path}: unexpected decoder tensor {key!r}")
            if tuple(shape) != shapes[name]:
                raise CheckpointError(
                    f"{path}: tensor {key!r} has shape {tuple(shape)}, config.json implies {shapes[name]}"
                )
            weights[name] = loader
    return DecoderSource(text, tokenizer, template, weights, _added_tokens(ckpt, fmt, image_token, pad_id), ckpt.name)


def _added_tokens(ckpt: Path, fmt: str, image_token: int | None, pad_id: int | None) -> list[AddedToken]:
    declared = added_tokens_from_dir(ckpt)
    if declared or fmt != "llava-hf" or image_token is None or image_token < 0:
        return declared
    return llava_hf_added_tokens(image_token, pad_id)


# ----------------------------------------------------------------------------- lazy tensor files

_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


def _lazy_tensors(path: Path):
    """(key, loader, shape) for each tensor of a weights file, loading nothing yet."""
    if path.suffix == ".safetensors":
        yield from _lazy_safetensors(path)
        return
    from ..reference.tensor_files import TensorFile

    tf = TensorFile(path)
    for key in tf.keys():
        yield key, (lambda k=key: tf.get(k).float().numpy()), tf.shape(key)


def _lazy_safetensors(path: Path):
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    base = 8 + n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
        yield key, _safetensors_loader(path, base, info), tuple(info["shape"])


def _safetensors_loader(path: Path, base: int, info: dict) -> Loader:
    def load() -> np.ndarray:
        begin, end = info["data_offsets"]
        out = np.empty(end - begin, dtype=np.uint8)
        with open(path, "rb", buffering=0) as f:
            f.seek(base + begin)
            if f.readinto(memoryview(out)) != end - begin:
                raise CheckpointError(f"{path}: truncated tensor data")
        array = out.view(_SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
        if info["dtype"] == "BF16":  # bfloat16 is the top half of a float32
            array = (array.astype(np.uint32) << 16).view(np.float32)
        return array

    return load
