"""train/clip_model.py: the shapes-world CLIP model's pieces (caption grammar, sin-cos positions)."""

import json

import torch

from llava_edge.architectures import VisionConfig
from llava_edge.train.clip_model import ClipModel, ClipTrainConfig, TextEncoderConfig, parse_caption, sincos_positions
from llava_edge.train.shapes import build_dataset


def micro_config(**overrides) -> ClipTrainConfig:
    cfg = ClipTrainConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=56, patch_size=14),
        text=TextEncoderConfig(width=32, layers=1, heads=2, context=32),
        embed_dim=16, batch_size=16, epochs=4, lr=3e-3,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def test_caption_grammar_parses_the_dataset_captions(tmp_path):
    build_dataset(tmp_path, n_train_images=64, n_test_images=0, seed=0, progress=False)
    for pair in json.loads((tmp_path / "clip_pairs.json").read_text()):
        objects = parse_caption(pair["caption"])
        left_to_right = sorted(pair["objects"], key=lambda o: ((o["bbox"][0] + o["bbox"][2]) // 2, o["bbox"][1]))
        assert objects == [(o["color"], o["shape"]) for o in left_to_right]
    assert parse_caption("A purple circle.") is None
    assert parse_caption("Two shapes: red circle, blue square.") is None


def test_sincos_positions_code_row_and_column_apart():
    v = micro_config().vision  # a 4x4 grid, width 32: rows in the first 16 features, columns in the last 16
    table = sincos_positions(v)
    assert table.shape == (17, 32)
    assert torch.equal(table[0], torch.zeros(32))  # CLS has no place
    grid = table[1:].reshape(4, 4, 32)
    assert torch.equal(grid[:, :1, :16].expand(4, 4, 16), grid[..., :16])  # same row, same first half
    assert torch.equal(grid[:1, :, 16:].expand(4, 4, 16), grid[..., 16:])  # same column, same second half
    assert torch.equal(grid[0, 0], torch.cat([torch.zeros(8), torch.ones(8)] * 2))  # sin 0, cos 1
    assert torch.allclose(grid[0, 1, 16:24], torch.sin(1.0 / 10000 ** (torch.arange(8) / 8)))
    assert len({tuple(row.tolist()) for row in table[1:]}) == 16


def test_tower_starts_from_sincos_positions_when_told_to():
    on = ClipModel(micro_config(sincos_positions=True), vocab_size=64).vision.embeddings.position_embedding.weight
    off = ClipModel(micro_config(), vocab_size=64).vision.embeddings.position_embedding.weight
    assert torch.equal(on.detach(), sincos_positions(micro_config().vision))
    assert off.detach().std() < 0.05
