"""The demo's attribute-level CLIP objective: texts, targets, and a micro run that learns."""

import math

import pytest
import torch

from llava_edge.architectures import VisionConfig
from llava_edge.train.clip_attributes import (
    ATTRIBUTE_TEXTS,
    AttributeClipConfig,
    multi_positive_loss,
    patch_columns,
    patch_labels,
    true_texts,
    train_attribute_clip,
)
from llava_edge.train.clip_model import ClipTrainConfig, TextEncoderConfig
from llava_edge.train.shapes import build_dataset


def test_true_texts_of_a_caption():
    assert true_texts("A red circle and a blue square.") == {
        "A red circle and a blue square.", "two shapes.", "a red circle.", "a blue square."}
    assert true_texts("A green triangle.") == {"A green triangle.", "one shape.", "a green triangle."}


def test_shared_attributes_are_not_negatives():
    logits = torch.tensor([[5.0, 5.0], [5.0, 5.0]])
    all_true = torch.ones(2, 2, dtype=torch.bool)
    diagonal = torch.eye(2, dtype=torch.bool)
    # with every text true of every image, equal scores are already optimal: the loss is the entropy floor
    assert multi_positive_loss(logits, all_true).item() == pytest.approx(math.log(2))
    sharp = torch.tensor([[9.0, 0.0], [0.0, 9.0]])
    assert multi_positive_loss(sharp, diagonal) < multi_positive_loss(logits, diagonal)


def test_patch_labels_follow_the_padded_boxes():
    # 200x100 pads to 200x200 with 50 px above; a 4x4 grid has patches of 50 px, centres 25, 75, ...
    record = {"size": [200, 100], "objects": [
        {"color": "red", "shape": "circle", "bbox": [0, 0, 100, 100]},  # y 50-150 once padded: rows 1-2
        {"color": "blue", "shape": "square", "bbox": [160, 10, 170, 20]},  # covers no centre: claims its own
    ]}
    red, blue, bg = ATTRIBUTE_TEXTS.index("a red circle."), ATTRIBUTE_TEXTS.index("a blue square."), 12
    assert patch_labels(record, 4).view(4, 4).tolist() == [
        [bg, bg, bg, bg],
        [red, red, bg, blue],
        [red, red, bg, bg],
        [bg, bg, bg, bg],
    ]


def test_patch_columns_give_object_patches_their_object_centre():
    # the same padded 200x200 square; 8 bins of 25 px: background patch centres 25, 75, 125, 175 -> bins 1, 3, 5, 7
    record = {"size": [200, 100], "objects": [
        {"color": "red", "shape": "circle", "bbox": [0, 0, 100, 100]},  # centre x 50 -> bin 2
        {"color": "blue", "shape": "square", "bbox": [160, 10, 170, 20]},  # covers no patch centre: no change
    ]}
    assert patch_columns(record, 4, 8).view(4, 4).tolist() == [
        [1, 3, 5, 7],
        [2, 2, 5, 7],
        [2, 2, 5, 7],
        [1, 3, 5, 7],
    ]


@pytest.mark.slow
def test_micro_run_learns_and_writes_a_clip_dir(tmp_path):
    data = tmp_path / "data"
    build_dataset(data, 96, 2, seed=3, progress=False)
    clip = ClipTrainConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=28, patch_size=14),
        text=TextEncoderConfig(width=32, layers=1, heads=2), embed_dim=16, batch_size=16, epochs=6, lr=3e-3)
    metrics = train_attribute_clip(AttributeClipConfig(clip=clip, heldout=16), data, tmp_path / "clip",
                                   progress=False)
    assert metrics["grounded"] and metrics["positioned"]
    losses = metrics["epoch_losses"]
    assert losses[-1] < losses[0] - 0.1
    assert 0.0 <= metrics["heldout_attribute_set_acc"] <= 1.0
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel.from_pretrained(tmp_path / "clip")
    assert tower.config.num_hidden_layers == 2 and (tmp_path / "clip" / "clip_train.json").exists()


def _one_epoch(data, out, seed=0):
    clip = ClipTrainConfig(
        vision=VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                            image_size=56, patch_size=14),
        text=TextEncoderConfig(width=32, layers=1, heads=2), embed_dim=16, batch_size=16, epochs=1, lr=3e-3)
    train_attribute_clip(AttributeClipConfig(clip=clip, heldout=16, seed=seed), data, out, progress=False)
    return out


@pytest.mark.slow
def test_saved_tower_matches_transformers_at_layer_minus_2_and_is_seeded(tmp_path):
    from safetensors.torch import load_file
    from transformers import CLIPVisionModel

    from llava_edge.architectures import read_json, vision_config_from_dict
    from llava_edge.image import load_image, preprocess
    from llava_edge.reference.clip_vision import VisionTransformer

    data = tmp_path / "data"
    build_dataset(data, 48, 0, seed=0, progress=False)
    out = _one_epoch(data, tmp_path / "a")
    hf = CLIPVisionModel.from_pretrained(out).eval()
    cfg = vision_config_from_dict(read_json(out / "config.json"))
    ours = VisionTransformer(cfg).eval()
    ours.load_state_dict({k.removeprefix("vision_model."): v for k, v in load_file(out / "model.safetensors").items()})
    images = sorted((data / "images").glob("train_*.png"))[:3]
    pixels = torch.stack([torch.from_numpy(preprocess(load_image(p), cfg.image_size)) for p in images])
    with torch.no_grad():
        expected = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        got = ours(pixels, [cfg.num_hidden_layers - 1])[0]
    assert got.shape == (3, cfg.num_patches + 1, 32)
    assert expected.abs().max() > 0.1
    assert (got - expected).abs().max().item() <= 1e-5
    assert read_json(out / "preprocessor_config.json")["crop_size"] == {"height": 56, "width": 56}

    a, b, c = (load_file(d / "model.safetensors")
               for d in (out, _one_epoch(data, tmp_path / "b"), _one_epoch(data, tmp_path / "c", seed=1)))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    key = "vision_model.encoder.layers.0.mlp.fc1.weight"
    assert not torch.equal(a[key], c[key])
