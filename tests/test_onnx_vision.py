"""vision.onnx against the PyTorch reference (`Llava.encode_images`), and the precision guard."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from llava_edge.export import onnx_vision
from llava_edge.export.onnx_vision import export_vision_onnx_report, vision_parity
from llava_edge.quant import onnx_files
from llava_edge.quant.onnx_run import embeddings_agreement, reference_embeddings, run_onnx, run_onnx_tokens
from llava_edge.quant import vision_precision as quant
from llava_edge.quant.vision_precision import choose_precision
from llava_edge.reference.checkpoint import load_checkpoint
from tiny_checkpoints import make_hf_model, save_full_clip, save_hf_layout, save_liuhaotian_layout

VARIANTS = {
    "llava-hf-28-layer-2-patch": dict(image_size=28, feature_layer=-2, strategy="default"),
    "llava-hf-56-layer-1-full": dict(image_size=56, feature_layer=-1, strategy="full", seed=1),
    "llava-hf-28-layers-3-1-patch": dict(image_size=28, feature_layer=[-3, -1], strategy="default", seed=2),
    "liuhaotian-56-layer-2-patch": dict(image_size=56, feature_layer=-2, strategy="default", seed=3),
}


def load_variant(name: str, directory):
    hf = make_hf_model(**VARIANTS[name])
    if name.startswith("liuhaotian"):
        clip = save_full_clip(hf, directory / "clip")
        ckpt = save_liuhaotian_layout(hf, directory / "llava", "openai/clip-vit-large-patch14-336")
        return load_checkpoint(ckpt, vision_tower=clip).model
    return load_checkpoint(save_hf_layout(hf, directory / "llava", "save_pretrained")).model


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    model = load_variant(request.param, directory)
    report = export_vision_onnx_report(model, directory / "bundle" / "vision.onnx", exporter="torchscript")
    return model, report


def pixels(n: int, size: int, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


def test_fp32_matches_the_reference_at_a_batch_it_was_not_traced_with(exported):
    model, report = exported
    size = model.cfg.vision.image_size
    batch = pixels(3, size)  # traced with batch 1
    out = run_onnx(report.path, batch)
    assert out.shape == (3, model.cfg.n_image_tokens, model.cfg.projector.out_features)
    parity = vision_parity(report.path, model, batch)
    assert parity["cosine_min"] >= 0.99999
    assert parity["max_abs"] <= 1e-4
    # each image is encoded independently of its batch neighbours
    assert np.abs(run_onnx(report.path, batch[1:2])[0] - out[1]).max() <= 1e-5


def test_graph_contract_and_checker(exported):
    model, report = exported
    onnx.checker.check_model(str(report.path))
    graph = onnx.load(str(report.path)).graph
    inputs, outputs = {i.name: i for i in graph.input}, {o.name: o for o in graph.output}
    assert list(inputs) == ["pixel_values", "image_tokens"] and list(outputs) == ["image_embeds", "image_token_patches"]
    inp, out = inputs["pixel_values"], outputs["image_embeds"]
    assert inp.type.tensor_type.elem_type == out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    s = model.cfg.vision.image_size
    assert dims == ["batch", 3, s, s]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert out_dims[0] == "batch" and isinstance(out_dims[1], str)  # the token count follows image_tokens
    budget = inputs["image_tokens"].type.tensor_type
    assert budget.elem_type == onnx.TensorProto.INT64 and len(budget.shape.dim) == 0
    default = {t.name: t for t in graph.initializer}["image_tokens"]  # its default: every token
    assert onnx.numpy_helper.to_array(default) == model.cfg.n_image_tokens


def budgets_of(model) -> list[int]:
    n, low = model.cfg.n_image_tokens, 1 + model.cfg.keeps_cls
    return sorted({low, low + 1, n // 2, n - 1})


def test_fewer_tokens_match_the_reference_at_several_budgets(exported):
    model, report = exported
    batch = pixels(3, model.cfg.vision.image_size, seed=21)
    parity = onnx_vision.reduction_parity(report.path, model, batch, budgets_of(model))
    assert list(parity) == [str(k) for k in budgets_of(model)]
    for k, row in parity.items():
        assert row["patches_equal"] == 1.0, k
        assert row["cosine_min"] >= 0.99999 and row["max_abs"] <= 1e-4, k
    embeds, patches = run_onnx_tokens(report.path, batch, image_tokens=2 + model.cfg.keeps_cls)
    assert embeds.shape == (3, 2 + model.cfg.keeps_cls, model.cfg.projector.out_features)
    assert patches.shape == embeds.shape[:2] and patches.dtype == np.int64
    assert (patches[:, 0] == -1).all() == model.cfg.keeps_cls  # the CLS token comes first when the model keeps it


def test_default_is_every_token_as_before(exported):
    model, report = exported
    batch = pixels(2, model.cfg.vision.image_size, seed=22)
    default, patches = run_onnx_tokens(report.path, batch)
    explicit = run_onnx(report.path, batch, image_tokens=model.cfg.n_image_tokens)
    assert np.array_equal(default, explicit)
    expected = list(range(model.cfg.vision.num_patches))
    assert patches[1].tolist() == ([-1] + expected if model.cfg.keeps_cls else expected)
    assert embeddings_agreement(default, reference_embeddings(model, batch))["cosine_min"] >= 0.99999


def test_graph_runs_only_the_needed_layers(exported):
    model, report = exported
    assert not report.fused and report.fused_cosine is None  # fusion is opt-in
    ops = [n.op_type for n in onnx.load(str(report.path)).graph.node]
    assert ops.count("Softmax") == max(model.cfg.feature_layers) < model.cfg.vision.num_hidden_layers + 1
    assert all(n.domain in ("", "ai.onnx") for n in onnx.load(str(report.path)).graph.node)  # standard ops only


@pytest.mark.slow
def test_default_dynamo_export_matches(tmp_path):
    model = load_variant("llava-hf-28-layers-3-1-patch", tmp_path)
    report = export_vision_onnx_report(model, tmp_path / "vision.onnx")
    assert report.exporter == "dynamo" and not report.fused
    assert sorted(p.name for p in tmp_path.glob("vision.onnx*")) == ["vision.onnx"]  # small: no external data
    parity = vision_parity(report.path, model, pixels(3, 28))
    assert parity["cosine_min"] >= 0.99999 and parity["max_abs"] <= 1e-4
    for row in onnx_vision.reduction_parity(report.path, model, pixels(3, 28), [1, 2, 3]).values():
        assert row["patches_equal"] == 1.0 and row["cosine_min"] >= 0.99999


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llava-hf-28-layer-2-patch", "llava-hf-56-layer-1-full"])
def test_fused_export_matches_and_quantizes(tmp_path, name):
    model = load_variant(name, tmp_path)
    report = export_vision_onnx_report(model, tmp_path / "vision.onnx", fuse=True, exporter="torchscript")
    assert report.fused and report.fused_cosine >= 0.99999
    ops = [n.op_type for n in onnx.load(str(report.path)).graph.node]
    assert ops.count("Attention") == max(model.cfg.feature_layers) and "Softmax" not in ops
    size = model.cfg.vision.image_size
    parity = vision_parity(report.path, model, pixels(3, size))
    assert parity["cosine_min"] >= 0.99999 and parity["max_abs"] <= 1e-4
    assert choose_precision(report.path, pixels(2, size), model, "int8").cosine >= 0.999


@pytest.mark.slow
@pytest.mark.parametrize("exporter, fuse", [("torchscript", True), ("dynamo", False)])  # both save paths
def test_weights_go_to_one_external_file_when_the_graph_is_too_big(tmp_path, monkeypatch, exporter, fuse):
    model = load_variant("llava-hf-28-layer-2-patch", tmp_path)
    monkeypatch.setattr(onnx_files, "PROTOBUF_LIMIT", 10_000)  # stands in for protobuf's 2 GB
    path = onnx_vision.export_vision_onnx(model, tmp_path / "out" / "vision.onnx", fuse=fuse, exporter=exporter)
    assert (tmp_path / "out" / "vision.onnx.data").stat().st_size > 50_000  # the weights, not just a few
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["vision.onnx", "vision.onnx.data"]
    assert vision_parity(path, model, pixels(2, 28))["cosine_min"] >= 0.99999
    int8 = choose_precision(path, pixels(2, 28), model, "int8")
    assert int8.cosine >= 0.999


def test_single_file_writer_reads_back_as_the_same_model(exported, tmp_path):
    model, report = exported
    original = onnx.load(str(report.path))
    onnx_files.write_single_file(onnx.load(str(report.path)), tmp_path / "copy.onnx")
    assert onnx.load(str(tmp_path / "copy.onnx")) == original
    size = model.cfg.vision.image_size
    assert np.array_equal(run_onnx(tmp_path / "copy.onnx", pixels(1, size)), run_onnx(report.path, pixels(1, size)))


@pytest.mark.slow
@pytest.mark.parametrize("requested, bound", [("fp16", 0.9999), ("int8", 0.999)])
def test_reduced_precision_holds_its_fidelity_bound(exported, requested, bound):
    model, report = exported
    choice = choose_precision(report.path, pixels(4, model.cfg.vision.image_size, seed=11), model, requested)
    assert choice.precision == requested and choice.path != report.path and choice.path.exists()
    graph = onnx.load(str(choice.path)).graph
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # IO stays float32
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    stored = {onnx.TensorProto.FLOAT16 if requested == "fp16" else onnx.TensorProto.INT8}
    assert stored & {t.data_type for t in graph.initializer}  # the weights really are reduced
    # an independent measurement on other pixels than the ones the choice was scored on
    assert vision_parity(choice.path, model, pixels(2, model.cfg.vision.image_size, seed=12))["cosine_min"] >= bound
    assert choice.cosine >= bound
    # token reduction survives the conversion: K tokens, and the reference's where the same patches are chosen
    parity = onnx_vision.reduction_parity(choice.path, model, pixels(4, model.cfg.vision.image_size, seed=12),
                                          budgets_of(model))
    assert sum(row["patches_equal"] for row in parity.values()) >= len(parity) / 2
    assert all(row["cosine_min_same_patches"] >= bound for row in parity.values() if row["patches_equal"])


@pytest.mark.slow
def test_auto_keeps_int8_only_above_the_threshold(exported, monkeypatch):
    model, report = exported
    calib = pixels(2, model.cfg.vision.image_size, seed=13)
    int8_path = report.path.with_name("vision.int8.onnx")

    monkeypatch.setattr(quant, "INT8_MIN_COSINE", 0.5)
    kept = choose_precision(report.path, calib, model, "auto")
    assert kept.precision == "int8" and kept.path == int8_path and int8_path.exists()

    monkeypatch.setattr(quant, "INT8_MIN_COSINE", 1.0 + 1e-9)  # no int8 graph can reach it
    rejected = choose_precision(report.path, calib, model, "auto")
    assert rejected.precision == "fp32" and rejected.path == report.path
    assert rejected.cosine >= 0.99999
    assert not int8_path.exists()  # the rejected graph is not left in the bundle


def test_auto_against_the_fp32_graph_when_no_reference_model(exported):
    model, report = exported
    choice = choose_precision(report.path, pixels(2, model.cfg.vision.image_size), None, "fp32")
    assert choice.precision == "fp32" and choice.cosine == pytest.approx(1.0, abs=1e-12)


def test_unknown_precision_is_refused(exported):
    _, report = exported
    with pytest.raises(ValueError, match="int4"):
        choose_precision(report.path, pixels(1, 28), None, "int4")


def test_export_leaves_the_model_untouched(tmp_path):
    model = load_variant("llava-hf-28-layer-2-patch", tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("vision.", "projector."))}
    x = torch.from_numpy(pixels(1, 28))
    with torch.no_grad():
        expected = model.encode_images(x)
    onnx_vision.export_vision_onnx(model, tmp_path / "vision.onnx", exporter="torchscript")
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    with torch.no_grad():
        assert torch.equal(model.encode_images(x), expected)
