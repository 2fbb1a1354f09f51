"""A random-weight LLaVA-1.5-7B in the original liuhaotian layout, in a Hugging Face cache (a script, not a test).

    python experiments/make_llava7b_hf_cache.py [--hf-home /work/hf] [--layers 32] [--seed 0]

Writes, as `huggingface-cli download` would lay them out (blobs + snapshots/<hash>/ symlinks + refs/main):
  models--liuhaotian--llava-v1.5-7b            LLaMA config with Vicuna-7B's shapes and the mm_* keys, two fp16
                                               `.bin` shards (torch zip format) + pytorch_model.bin.index.json,
                                               `model.mm_projector.{0,2}`, a 32000-piece SentencePiece BPE
                                               tokenizer.model, tokenizer_config / special_tokens_map
  models--openai--clip-vit-large-patch14-336   the full CLIP config (ViT-L/14 at 336 px + text tower),
                                               preprocessor_config.json, fp32 model.safetensors

Tensor names and shapes come from transformers (LlamaForCausalLM, CLIPModel built on the meta device), not
from llava_edge. Weights: N(0, 0.02) matrices and embeddings, norms/LayerNorm scales N(1, 0.1), biases
N(0, 0.02) (random values do not change the compute; the scale keeps activations finite). Memory stays low:
each tensor is generated alone into a file-backed scratch memmap, so a 10 GB shard is never in anonymous
memory; the safetensors file is written tensor by tensor. About 15.5 GB on disk when done (plus one
shard's scratch while a shard is written).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

LLAVA_REPO = "liuhaotian/llava-v1.5-7b"
CLIP_REPO = "openai/clip-vit-large-patch14-336"
SHARD_BYTES = 10 * 10**9  # transformers' default max_shard_size "10GB" (the real repo: 9.98 GB + 3.54 GB)

LLAVA_CONFIG = {  # llava-v1.5-7b's config.json, key for key
    "_name_or_path": "./checkpoints/vicuna-7b-v1-5",
    "architectures": ["LlavaLlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "freeze_mm_mlp_adapter": False,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "image_aspect_ratio": "pad",
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 4096,
    "mm_hidden_size": 1024,
    "mm_projector_type": "mlp2x_gelu",
    "mm_use_im_patch_token": False,
    "mm_use_im_start_end": False,
    "mm_vision_select_feature": "patch",
    "mm_vision_select_layer": -2,
    "mm_vision_tower": CLIP_REPO,
    "model_type": "llava",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "pad_token_id": 0,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.31.0",
    "tune_mm_mlp_adapter": False,
    "use_cache": True,
    "use_mm_proj": True,
    "vocab_size": 32000,
}

TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False,
                  "rstrip": False, "single_word": False},
    "clean_up_tokenization_spaces": False,
    "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": False,
                  "rstrip": False, "single_word": False},
    "legacy": False,
    "model_max_length": 2048,
    "pad_token": None,
    "padding_side": "right",
    "sp_model_kwargs": {},
    "tokenizer_class": "LlamaTokenizer",
    "unk_token": {"__type": "AddedToken", "content": "<unk>", "lstrip": False, "normalized": False,
                  "rstrip": False, "single_word": False},
}
SPECIAL_TOKENS_MAP = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>"}

CLIP_PREPROCESSOR = {
    "crop_size": 336,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 336,
}


def clip_config():
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config={"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                     "num_hidden_layers": 12, "projection_dim": 768, "vocab_size": 49408,
                     "max_position_embeddings": 77, "hidden_act": "quick_gelu"},
        vision_config={"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                       "num_hidden_layers": 24, "image_size": 336, "patch_size": 14, "projection_dim": 768,
                       "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05},
        projection_dim=768,
    )


def llava_shapes(n_layers: int) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, in the order LLaVA's save writes them (LLaMA's, then the projector)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "rms_norm_eps", "max_position_embeddings")
    cfg = LlamaConfig(**{k: LLAVA_CONFIG[k] for k in keys}, num_hidden_layers=n_layers, tie_word_embeddings=False)
    with torch.device("meta"):
        llama = LlamaForCausalLM(cfg)
    shapes = {k: tuple(v.shape) for k, v in llama.state_dict().items()}
    d, mm = LLAVA_CONFIG["hidden_size"], LLAVA_CONFIG["mm_hidden_size"]
    shapes.update({"model.mm_projector.0.weight": (d, mm), "model.mm_projector.0.bias": (d,),
                   "model.mm_projector.2.weight": (d, d), "model.mm_projector.2.bias": (d,)})
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    t = torch.randn(shape, generator=gen)
    if len(shape) == 1 and ("norm" in name or "layernorm" in name):
        return t.mul_(0.1).add_(1.0)
    return t.mul_(0.02)


# ----------------------------------------------------------------------------- files


def train_tokenizer(path: Path) -> None:
    """A 32000-piece SentencePiece BPE model with LLaMA's settings, trained on the Python stdlib's source."""
    import sentencepiece as spm

    files = sorted(glob.glob(os.path.join(sys.base_prefix, "lib", "python3*", "**", "*.py"), recursive=True))

    def lines():
        for f in files:
            try:
                text = Path(f).read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            yield from (line.strip() for line in text.splitlines() if line.strip())

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(), model_writer=model, model_type="bpe", vocab_size=32000, byte_fallback=True,
        split_digits=True, character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, allow_whitespace_only_pieces=True, max_sentencepiece_length=16,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, input_sentence_size=2_000_000, shuffle_input_sentence=True,
        num_threads=1, minloglevel=2,
    )
    path.write_bytes(model.getvalue())


def write_torch_shard(path: Path, items: list[tuple[str, tuple[int, ...]]], gen: torch.Generator, scratch: Path) -> None:
    """torch.save of fp16 tensors, each generated alone into its own file-backed memmap (no anonymous copy)."""
    scratch.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i, (name, shape) in enumerate(items):
        mm = np.memmap(scratch / f"{i}.f16", dtype=np.float16, mode="w+", shape=shape)
        torch.from_numpy(mm).copy_(random_tensor(name, shape, gen))
        mm.flush()
        tensors[name] = torch.from_numpy(mm)
    torch.save(tensors, path)
    del tensors
    shutil.rmtree(scratch)


def write_safetensors(path: Path, items: list[tuple[str, tuple[int, ...]]], gen: torch.Generator) -> None:
    """fp32 safetensors written tensor by tensor: 8-byte header size, JSON header, then the raw data."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in items:
        n = int(np.prod(shape)) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, shape in items:
            f.write(random_tensor(name, shape, gen).numpy().astype("<f4").tobytes())


class HfRepo:
    """One repo in a Hugging Face hub cache: files go to blobs/<sha256>, snapshots/<hash>/<name> links to them."""

    def __init__(self, hub: Path, repo: str):
        self.root = hub / ("models--" + repo.replace("/", "--"))
        self.commit = hashlib.sha1(f"llava-edge random weights {repo}".encode()).hexdigest()
        self.snapshot = self.root / "snapshots" / self.commit
        for d in (self.root / "blobs", self.root / "refs", self.snapshot):
            d.mkdir(parents=True, exist_ok=True)
        (self.root / "refs" / "main").write_text(self.commit)

    def staging(self, name: str) -> Path:
        return self.root / "blobs" / f".incomplete-{name}"

    def publish(self, name: str) -> Path:
        """Move the staged file into blobs under its sha256 and link it from the snapshot."""
        staged = self.staging(name)
        digest = hashlib.sha256()
        with open(staged, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                digest.update(chunk)
        blob = self.root / "blobs" / digest.hexdigest()
        staged.replace(blob)
        link = self.snapshot / name
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        return link

    def write_json(self, name: str, obj: dict) -> Path:
        self.staging(name).write_text(json.dumps(obj, indent=2) + "\n")
        return self.publish(name)

    def has(self, name: str) -> bool:
        return (self.snapshot / name).exists()


def make_clip(hub: Path, gen: torch.Generator) -> Path:
    from transformers import CLIPModel

    repo = HfRepo(hub, CLIP_REPO)
    if not repo.has("model.safetensors"):
        cfg = clip_config()
        with torch.device("meta"):
            shapes = {k: tuple(v.shape) for k, v in CLIPModel(cfg).state_dict().items() if not k.endswith("position_ids")}
        write_safetensors(repo.staging("model.safetensors"), list(shapes.items()), gen)
        repo.publish("model.safetensors")
        repo.write_json("config.json", {**cfg.to_dict(), "architectures": ["CLIPModel"], "torch_dtype": "float32"})
        repo.write_json("preprocessor_config.json", CLIP_PREPROCESSOR)
    return repo.snapshot


def make_llava(hub: Path, n_layers: int, gen: torch.Generator) -> Path:
    repo = HfRepo(hub, LLAVA_REPO)
    shapes = llava_shapes(n_layers)
    shards, size = [[]], 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += n
    weight_map = {}
    for i, items in enumerate(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        if not repo.has(name):
            t0 = time.perf_counter()
            write_torch_shard(repo.staging(name), items, gen, repo.root / "blobs" / f".scratch-{i}")
            repo.publish(name)
            print(f"{name}: {len(items)} tensors in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        weight_map.update({k: name for k, _ in items})
    total = sum(int(np.prod(s)) * 2 for s in shapes.values())
    repo.write_json("pytorch_model.bin.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    if not repo.has("tokenizer.model"):
        train_tokenizer(repo.staging("tokenizer.model"))
        repo.publish("tokenizer.model")
    repo.write_json("tokenizer_config.json", TOKENIZER_CONFIG)
    repo.write_json("special_tokens_map.json", SPECIAL_TOKENS_MAP)
    repo.write_json("generation_config.json", {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2,
                                               "pad_token_id": 0, "transformers_version": "4.31.0"})
    repo.write_json("config.json", {**LLAVA_CONFIG, "num_hidden_layers": n_layers})  # last: marks it complete
    return repo.snapshot


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf-home", default=os.environ.get("HF_HOME", "/work/hf"))
    p.add_argument("--layers", type=int, default=32, help="decoder blocks (32 = LLaVA-1.5-7B)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    hub = Path(args.hf_home) / "hub"
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    clip = make_clip(hub, gen)
    llava = make_llava(hub, args.layers, gen)
    print(json.dumps({"llava": str(llava), "clip": str(clip), "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
