"""mmproj.gguf: llama.cpp loads it, runs the right layers on the right weights; the gap to the reference is measured."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGUFReader

from llava_edge.bench.llamacpp_mtmd import llamacpp_image_embeddings
from llava_edge.errors import UserError
from llava_edge.export import pipeline
from llava_edge.export.mmproj import write_mmproj
from llava_edge.quant.onnx_run import embeddings_agreement, reference_embeddings
from llava_edge.image import load_image, preprocess
from llava_edge.reference.checkpoint import load_checkpoint
from tiny_checkpoints import make_hf_model, save_full_clip, save_hf_layout, save_liuhaotian_layout
from tiny_text_gguf import write_tiny_llama_gguf

PHOTO = Path(__file__).parent / "data" / "astronaut.jpg"


@pytest.fixture(scope="module", params=["llava-hf-28-layer-2", "liuhaotian-56-layer-1"])
def model(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    if request.param.startswith("liuhaotian"):
        hf = make_hf_model(image_size=56, feature_layer=-1, seed=4)
        clip = save_full_clip(hf, d / "clip")
        return load_checkpoint(save_liuhaotian_layout(hf, d / "llava", "clip"), vision_tower=clip).model
    return load_checkpoint(save_hf_layout(make_hf_model(image_size=28, feature_layer=-2), d / "llava", "save_pretrained")).model


@pytest.fixture(scope="module")
def text_gguf(tmp_path_factory):
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("text") / "text.gguf", n_embd=48)


def field(reader: GGUFReader, key: str):
    f = reader.fields[key]
    values = [f.parts[i].tolist() for i in f.data]
    if f.types[0].name == "STRING":
        return bytes(f.parts[f.data[0]]).decode()
    return values if f.types[0].name == "ARRAY" else values[0][0]


def test_metadata_and_tensors(model, tmp_path):
    cfg = model.cfg
    reader = GGUFReader(write_mmproj(model, cfg, tmp_path / "mmproj.gguf"))
    n_blocks = max(cfg.feature_layers)
    assert field(reader, "general.architecture") == "clip"
    assert field(reader, "clip.projector_type") == "mlp"
    assert field(reader, "clip.has_vision_encoder") is True and field(reader, "clip.has_llava_projector") is True
    assert field(reader, "clip.use_gelu") is False  # CLIP's quick_gelu
    assert field(reader, "clip.vision.block_count") == n_blocks
    assert [v[0] for v in field(reader, "clip.vision.feature_layer")] == cfg.feature_layers
    assert field(reader, "clip.vision.image_size") == cfg.vision.image_size
    assert field(reader, "clip.vision.projection_dim") == cfg.projector.out_features
    assert np.allclose([v[0] for v in field(reader, "clip.vision.image_mean")], cfg.image_mean)
    tensors = {t.name: t for t in reader.tensors}
    assert f"v.blk.{n_blocks - 1}.ffn_down.weight" in tensors and f"v.blk.{n_blocks}.ln1.weight" not in tensors
    assert not any(name.startswith("v.post_ln") for name in tensors)
    assert tensors["v.blk.0.attn_q.weight"].tensor_type.name == "F16"
    assert tensors["v.blk.0.attn_q.bias"].tensor_type.name == "F32"
    q = model.vision.encoder.layers[0].self_attn.q_proj.weight.detach().numpy()
    stored = np.asarray(tensors["v.blk.0.attn_q.weight"].data, dtype=np.float32).reshape(q.shape)
    assert np.abs(stored - q).max() <= 1e-3 * np.abs(q).max()
    assert np.array_equal(np.asarray(tensors["mm.2.bias"].data), model.projector.linears[1].bias.detach().numpy())


def llamacpp_layout_embeddings(model, pixels: np.ndarray) -> np.ndarray:
    """What llama.cpp's LLaVA graph computes, written with our modules: CLS concatenated after the patches,
    position rows in that order, then rows 1..N taken (the first patch dropped, CLS kept), tanh GELU."""
    vis, cfg = model.vision, model.cfg
    with torch.no_grad():
        e = vis.embeddings
        patches = e.patch_embedding(torch.from_numpy(pixels)).flatten(2).transpose(1, 2)
        x = torch.cat([patches, e.class_embedding.expand(len(patches), 1, -1)], 1) + e.position_embedding.weight
        x = vis.pre_layrnorm(x)
        states = [x]
        for layer in vis.encoder.layers[: max(cfg.feature_layers)]:
            states.append(layer(states[-1]))
        x = torch.cat([states[i] for i in cfg.feature_layers], -1)[:, 1:]
        first, second = model.projector.linears
        return second(F.gelu(first(x), approximate="tanh")).numpy()


@pytest.mark.parametrize("ftype", ["f16", "f32"])
def test_llamacpp_loads_it_and_computes_from_our_weights(model, text_gguf, tmp_path, ftype):
    cfg = model.cfg
    path = write_mmproj(model, cfg, tmp_path / f"mmproj-{ftype}.gguf", ftype=ftype)
    size = cfg.vision.image_size
    # an image already S x S: llama.cpp's resize and ours are both the identity, so the pixels agree
    image = load_image(PHOTO).resize((size, size))
    got = llamacpp_image_embeddings(path, text_gguf, np.asarray(image), threads=1).embeddings
    assert got.shape == (cfg.n_image_tokens, cfg.projector.out_features)
    pixels = preprocess(image, size, cfg.image_mean, cfg.image_std, "pad")[None]
    vs_reference = embeddings_agreement(got, reference_embeddings(model, pixels)[0])
    vs_llamacpp_layout = embeddings_agreement(got, llamacpp_layout_embeddings(model, pixels)[0])
    print(f"\n{ftype}: llama.cpp vs reference {vs_reference}; vs llama.cpp's token layout {vs_llamacpp_layout}")
    # Our weights and layer count are right if llama.cpp reproduces either the reference or its own
    # known token layout (which differs from the reference: a llama.cpp property, reported not hidden).
    assert max(vs_reference["cosine_min"], vs_llamacpp_layout["cosine_min"]) >= 0.999


def test_llava15_chat_handler_runs_it(model, text_gguf, tmp_path):
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    if model.cfg.vision.image_size != 28:
        pytest.skip("one fixture is enough")
    path = write_mmproj(model, model.cfg, tmp_path / "mmproj.gguf")
    buf = io.BytesIO()
    load_image(PHOTO).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    llm = Llama(str(text_gguf), chat_handler=Llava15ChatHandler(str(path), verbose=False), n_ctx=512,
                n_threads=1, verbose=False)
    out = llm.create_chat_completion(
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                               {"type": "text", "text": "a"}]}],
        max_tokens=2, temperature=0.0,
    )
    assert out["usage"]["prompt_tokens"] > model.cfg.n_image_tokens


def test_variants_llamacpp_cannot_express_are_refused(tmp_path):
    d = tmp_path / "full"
    full = load_checkpoint(save_hf_layout(make_hf_model(strategy="full"), d, "save_pretrained")).model
    with pytest.raises(UserError, match="CLS"):
        write_mmproj(full, full.cfg, tmp_path / "mmproj.gguf")
    assert not (tmp_path / "mmproj.gguf").exists()


def test_export_refuses_an_inexpressible_mmproj_before_reading_weights(tmp_path, monkeypatch):
    ckpt = save_hf_layout(make_hf_model(strategy="full"), tmp_path / "full", "save_pretrained")

    def no_weights(*args, **kwargs):
        raise AssertionError("the checkpoint's weights were read before the mmproj check")

    monkeypatch.setattr(pipeline, "load_checkpoint", no_weights)
    out = tmp_path / "bundle"
    with pytest.raises(UserError, match="CLS"):
        pipeline.export_bundle(pipeline.ExportOptions(str(ckpt), str(out), mmproj=True, progress=False))
    assert not out.exists()
