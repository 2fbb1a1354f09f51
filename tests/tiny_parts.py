"""Tiny starting parts for training runs: a shapes dataset + tokenizer, a random LLaMA dir, a random CLIP dir."""

from pathlib import Path

import torch

from llava_edge.architectures import TextConfig, VisionConfig
from llava_edge.reference.checkpoint_writer import save_clip_vision, save_llama
from llava_edge.reference.llama import Llama
from llava_edge.reference.clip_vision import VisionTransformer
from llava_edge.train.shapes import build_dataset


def make_parts(root: Path, n_train: int = 24, n_test: int = 8) -> dict:
    data = build_dataset(root / "data", n_train, n_test, seed=0, progress=False)
    torch.manual_seed(0)
    text = TextConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    save_llama(Llama(text), text, root / "llm", data["tokenizer"])
    vision = VisionTransformer(VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, image_size=28, patch_size=14))
    save_clip_vision(vision, root / "clip")
    return {**data, "llm": root / "llm", "clip": root / "clip", "root": root}
