import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file

from llava_edge.config import VisionConfig, read_json, vision_config_from_dict
from llava_edge.image import load_image, preprocess
from llava_edge.reference.vision import VisionTransformer
from llava_edge.train.clip_pretrain import (
    ClipModel,
    ClipTrainConfig,
    TextEncoderConfig,
    contrastive_loss,
    hard_negatives,
    parse_caption,
    render_text,
    sincos_positions,
    text_style,
    train_clip,
    world_captions,
)
from llava_edge.train.shapes import build_dataset


def micro_config(**overrides) -> ClipTrainConfig:
    cfg = ClipTrainConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=56, patch_size=14),
        text=TextEncoderConfig(width=32, layers=1, heads=2, context=32),
        embed_dim=16, batch_size=16, epochs=4, lr=3e-3, hard_negatives=2, num_threads=1,
    )
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    build_dataset(out, n_train_images=64, n_test_images=16, seed=0, progress=False)
    return out


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("clip")
    return out, train_clip(micro_config(), data_dir, out, progress=False)


def test_loss_decreases_and_record_is_written(trained):
    out, metrics = trained
    losses = metrics["epoch_losses"]
    assert len(losses) == 4
    assert losses[-1] < losses[0] - 0.05
    record = json.loads((out / "clip_train.json").read_text())
    assert record["config"]["vision"]["hidden_size"] == 32
    assert ClipTrainConfig.from_dict(record["config"]) == micro_config()
    assert record["metrics"]["final_loss"] == pytest.approx(losses[-1])
    heldout = record["metrics"]["heldout"]
    assert heldout["n_images"] == 16 and 0.0 <= heldout["retrieval_acc"] <= 1.0
    assert heldout["n_world_captions"] == len(world_captions()) == 12 + 12 * 11 + 12 * 11 * 10


def test_saved_tower_matches_transformers_at_layer_minus_2(trained, data_dir):
    from transformers import CLIPVisionModel

    out, _ = trained
    hf = CLIPVisionModel.from_pretrained(out).eval()
    cfg = vision_config_from_dict(read_json(out / "config.json"))
    ours = VisionTransformer(cfg).eval()
    state = {k.removeprefix("vision_model."): v for k, v in load_file(out / "model.safetensors").items()}
    ours.load_state_dict(state)
    images = sorted((data_dir / "images").glob("train_*.png"))[:3]
    pixels = torch.stack([torch.from_numpy(preprocess(load_image(p), cfg.image_size)) for p in images])
    with torch.no_grad():
        expected = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        got = ours(pixels, [cfg.num_hidden_layers - 1])[0]
    assert got.shape == (3, cfg.num_patches + 1, 32)
    assert expected.abs().max() > 0.1
    assert (got - expected).abs().max().item() <= 1e-5
    pre = read_json(out / "preprocessor_config.json")
    assert pre["crop_size"] == {"height": 56, "width": 56}


def test_same_seed_same_weights_other_seed_differs(trained, data_dir, tmp_path):
    out, _ = trained
    train_clip(micro_config(epochs=1), data_dir, tmp_path / "a", progress=False)
    train_clip(micro_config(epochs=1), data_dir, tmp_path / "b", progress=False)
    train_clip(micro_config(epochs=1, seed=1), data_dir, tmp_path / "c", progress=False)
    a, b, c = (load_file(tmp_path / name / "model.safetensors") for name in "abc")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["vision_model.encoder.layers.0.mlp.fc1.weight"], c["vision_model.encoder.layers.0.mlp.fc1.weight"])


def test_caption_grammar_round_trips_the_dataset_texts(data_dir):
    pairs = json.loads((data_dir / "clip_pairs.json").read_text())
    for pair in pairs:
        objects = parse_caption(pair["caption"])
        assert objects is not None
        assert [render_text(objects, text_style(t)) for t in pair["texts"]] == pair["texts"]
    assert parse_caption("A purple circle.") is None
    assert parse_caption("Two shapes: red circle, blue square.") is None


def test_hard_negatives_are_distinct_wrong_descriptions():
    rng = random.Random(0)
    objects = [("red", "circle"), ("blue", "square"), ("green", "triangle")]
    seen_kinds = set()
    for _ in range(50):
        for style in ("caption", "listing"):
            negatives = hard_negatives(objects, style, 4, rng)
            assert len(negatives) == 4 and len(set(negatives)) == 4
            assert render_text(objects, style) not in negatives
            assert all(text_style(n) == style for n in negatives)
            for n in negatives if style == "caption" else []:
                wrong = parse_caption(n)
                assert wrong != objects and len(set(wrong)) == len(wrong)
                if sorted(wrong) == sorted(objects):
                    seen_kinds.add("order")
                elif len(wrong) != 3:
                    seen_kinds.add("count")
    assert seen_kinds == {"order", "count"}
    assert hard_negatives(None, "caption", 4, rng) == []


def test_identical_captions_are_not_negatives():
    # Images 0 and 1 share a caption; image 2 has another one.
    scale = torch.tensor(50.0)
    same = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    e, f, g = torch.eye(3)
    together = torch.stack([e, e, f])  # both images of the caption and both of its texts embed alike
    apart = torch.stack([e, g, f])  # the two get pushed apart, as if they were negatives of each other

    def loss(image, text, same):
        return contrastive_loss(image, text, same, scale).item()

    # Shared targets: "together" sits at the loss's floor (the entropy of the target) and "apart" costs more.
    assert loss(together, together, same) == pytest.approx(2 * math.log(2) / 3, abs=1e-4)
    assert loss(apart, apart, same) > loss(together, together, same) + 0.1
    # Plain identity targets would reward pushing them apart instead.
    identity = torch.eye(3, dtype=torch.bool)
    assert loss(apart, apart, identity) < loss(together, together, identity) - 0.1
    # An extra (hard) negative text equal to image 2's embedding costs image 2 log 2 in the image->text term.
    with_negative = loss(together, torch.cat([together, f[None]]), same)
    assert with_negative == pytest.approx(loss(together, together, same) + math.log(2) / 6, abs=1e-4)


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
