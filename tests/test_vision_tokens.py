"""Fewer image tokens through the runtime (`model.vision.encode(source, model.image_budget(K))`) and the bundle
that offers them: against the PyTorch reference (`Llava.encode_images(pixels, K)`), cache keys by K, refusals,
and bundles exported before token reduction."""

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from llava_edge.errors import UserError
from llava_edge.export import pipeline
from llava_edge.image import load_image, preprocess
from llava_edge.reference.checkpoint import load_checkpoint
from llava_edge.runtime import Model
from llava_edge.runtime.bundle import open_bundle, sha256_of
from llava_edge.runtime.vision import VisionEncoder
from test_runtime import DATA, EXAMPLES
from tiny_checkpoints import make_liuhaotian_checkpoint

THREADS = 1
IMAGE = EXAMPLES / "green_triangle.png"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny LLaVA (16 patch tokens) and its F32 bundle with an fp32 vision graph."""
    root = tmp_path_factory.mktemp("tokens")
    ckpt = make_liuhaotian_checkpoint(root, seed=5, fmt="safetensors", n_shards=1)
    out = root / "bundle"
    manifest = pipeline.export_bundle(pipeline.ExportOptions(str(ckpt), str(out), quant="F32", vision_precision="fp32",
                                                             threads=THREADS, progress=False))
    return ckpt, out, manifest


def test_the_manifest_offers_fewer_tokens_with_their_parity(tiny):
    _, _, manifest = tiny
    v = manifest["vision"]
    assert (v["image_tokens_input"], v["image_tokens_min"], v["patches_output"], v["n_image_tokens"]) == (
        "image_tokens", 1, "image_token_patches", 16)
    parity = manifest["parity"]["vision"]["image_tokens"]
    assert list(parity) == ["1", "4", "8"]  # 16 // 9, 16 // 4, 16 // 2
    assert all(row["patches_equal"] == 1.0 and row["cosine_min"] >= 0.99999 for row in parity.values())


@pytest.mark.parametrize("k", [1, 5, 8, 15])
def test_encode_at_k_is_the_references(tiny, k):
    ckpt, bundle_dir, _ = tiny
    model = Model.open(bundle_dir, threads=THREADS)
    assert model.bundle.vision.reducible and model.n_image_tokens == 16
    enc = model.vision
    image = enc.encode(DATA / "astronaut_wide.png", model.image_budget(k))
    assert image.embeds.shape == (k, enc.n_embd) and image.n_tokens == k and image.budget_tag == f"-k{k}"
    assert image.embeds.flags["C_CONTIGUOUS"] and image.image_id == f"{image.sha256}-k{k}"
    loaded = load_checkpoint(ckpt, dtype=torch.float32)
    cfg = loaded.config
    pixels = preprocess(load_image(DATA / "astronaut_wide.png"), cfg.vision.image_size, cfg.image_mean, cfg.image_std,
                        cfg.aspect)
    with torch.no_grad():
        want = loaded.model.encode_images(torch.from_numpy(pixels)[None], image_tokens=k)[0].numpy()
    assert np.abs(image.embeds - want).max() < 1e-4


def test_the_cache_tells_budgets_apart(tiny, tmp_path):
    _, bundle_dir, _ = tiny
    model = Model.open(bundle_dir, threads=THREADS, image_cache_dir=tmp_path)
    enc, k = model.vision, model.image_budget
    runs = []

    class Recording:  # the ONNX session, recording what each run is fed
        def __init__(self, session):
            self.session = session

        def run(self, outputs, feeds):
            runs.append({k: v.tolist() for k, v in feeds.items() if k != "pixel_values"})
            return self.session.run(outputs, feeds)

    enc.session = Recording(enc.session)
    every, eight, four = enc.encode(IMAGE), enc.encode(IMAGE, k(8)), enc.encode(IMAGE, k(4))
    again_eight, again_every, all_sixteen = enc.encode(IMAGE, k(8)), enc.encode(IMAGE), enc.encode(IMAGE, k(16))
    # three encodes; the default one is fed pixels only, as before token reduction
    assert runs == [{}, {"image_tokens": 8}, {"image_tokens": 4}]
    assert not (every.cached or eight.cached or four.cached) and again_eight.cached and again_every.cached
    assert all_sixteen.cached  # K = the image's token count is every token: the same entry
    assert [e.n_tokens for e in (every, eight, four, again_eight, again_every)] == [16, 8, 4, 8, 16]
    assert np.array_equal(again_eight.embeds, eight.embeds) and every.image_id == every.sha256
    assert len(list(tmp_path.glob("*.npy"))) == 3
    fresh = Model.open(bundle_dir, threads=THREADS, image_cache_dir=tmp_path).vision
    fresh.encode_pixels = None  # a disk hit must not run the graph
    assert np.array_equal(fresh.encode(IMAGE.read_bytes(), k(4)).embeds, four.embeds)


@pytest.mark.parametrize("k", [0, -2, 17, 2.5, True, "8"])
def test_a_budget_outside_the_tokens_is_one_line(tiny, k):
    _, bundle_dir, _ = tiny
    model = Model.open(bundle_dir, threads=THREADS)
    with pytest.raises(UserError, match="from 1 to 16") as e:
        model.image_budget(k)
    assert "\n" not in str(e.value)
    assert model.image_budget(None).graph_tokens is None and model.image_budget(np.int64(3)).graph_tokens == 3
    assert model.image_budget(16) == model.image_budget(None)  # every token, however it is asked for


def old_style_bundle(bundle_dir, out):
    """The bundle as export wrote it before token reduction: a graph taking pixel_values only, giving
    image_embeds only, and a manifest without the token-reduction fields."""
    shutil.copytree(bundle_dir, out)
    graph_path = out / "vision.onnx"
    proto = onnx.load(str(graph_path))
    keep_in = [i for i in proto.graph.input if i.name == "pixel_values"]
    keep_out = [o for o in proto.graph.output if o.name == "image_embeds"]
    del proto.graph.input[:], proto.graph.output[:]
    proto.graph.input.extend(keep_in)  # the budget's initializer stays: a constant, every token
    proto.graph.output.extend(keep_out)
    onnx.save(proto, str(graph_path))
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("image_tokens_input", "image_tokens_min", "patches_output"):
        del manifest["vision"][key]
    manifest["parity"]["vision"].pop("image_tokens")
    manifest["files"]["vision"].update(sha256=sha256_of(graph_path), bytes=graph_path.stat().st_size)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out, manifest


def test_a_bundle_from_before_token_reduction_serves_every_token(tiny, tmp_path):
    _, bundle_dir, _ = tiny
    old, _ = old_style_bundle(bundle_dir, tmp_path / "old")
    model = Model.open(old, threads=THREADS)
    assert not model.bundle.vision.reducible
    new = Model.open(bundle_dir, threads=THREADS)
    assert np.array_equal(model.vision.encode(IMAGE).embeds, new.vision.encode(IMAGE).embeds)
    assert model.image_budget(16).graph_tokens is None  # every token: what the old graph gives
    with pytest.raises(UserError, match="predates token reduction.*re-export"):
        model.image_budget(8)


def test_a_manifest_naming_an_input_the_graph_lacks_is_refused(tiny, tmp_path):
    _, bundle_dir, _ = tiny
    old, manifest = old_style_bundle(bundle_dir, tmp_path / "old")
    manifest["vision"].update(image_tokens_input="image_tokens", image_tokens_min=1)
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="the graph has none"):
        VisionEncoder(open_bundle(old), threads=THREADS)
    manifest["vision"]["image_tokens_min"] = 16
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="image_tokens_min"):
        open_bundle(old)


@pytest.mark.slow
def test_refresh_brings_an_old_bundle_up_to_date_and_leaves_the_decoder(tiny, tmp_path):
    from llava_edge.export.vision_refresh import refresh_vision

    _, bundle_dir, exported = tiny
    old, _ = old_style_bundle(bundle_dir, tmp_path / "old")
    decoder = old / exported["files"]["decoder"]["name"]
    decoder_sha = sha256_of(decoder)
    manifest = refresh_vision(old, threads=THREADS)
    assert manifest["refresh"]["default_vs_old_graph"]["identical"]  # every token, as the old graph gave
    assert sha256_of(decoder) == decoder_sha and manifest["files"]["decoder"] == exported["files"]["decoder"]
    assert manifest["vision"] == exported["vision"]
    assert manifest["parity"]["vision"]["image_tokens"]["8"]["patches_equal"] == 1.0
    model = Model.open(old, threads=THREADS)  # checksums verify
    assert model.bundle.vision.reducible and model.vision.encode(IMAGE, model.image_budget(4)).n_tokens == 4
