"""The streamed int8 quantizer (quant/onnx_int8_streamed.py) writes what onnxruntime's quantize_dynamic writes.

Oracle: onnxruntime.quantization.quantize_dynamic(per_channel=True, weight_type=QInt8) on the same fp32
vision graph; both graphs run in ONNX Runtime on the same pixels.
"""

import numpy as np
import onnx
import pytest
from onnxruntime.quantization import QuantType, quantize_dynamic

from llava_edge.export.onnx_vision import export_vision_onnx
from llava_edge.quant.onnx_int8_streamed import graph_op_types, quantize_int8_streamed
from llava_edge.quant.onnx_run import embeddings_agreement, reference_embeddings, run_onnx
from llava_edge.reference.checkpoint import load_checkpoint
from tiny_checkpoints import make_hf_model, save_hf_layout


@pytest.fixture(scope="module", params=["torchscript", pytest.param("dynamo", marks=pytest.mark.slow)])
def fp32_graph(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    model = load_checkpoint(save_hf_layout(make_hf_model(image_size=56, seed=4), d / "llava", "save_pretrained")).model
    return model, export_vision_onnx(model, d / "vision.onnx", exporter=request.param)


def pixels(n=3, size=56):
    return np.random.default_rng(1).standard_normal((n, 3, size, size)).astype(np.float32)


def ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def test_same_graph_and_outputs_as_onnxruntime(fp32_graph, tmp_path):
    model, fp32 = fp32_graph
    ours = quantize_int8_streamed(fp32, tmp_path / "ours.onnx")
    theirs = tmp_path / "ort.onnx"
    quantize_dynamic(str(fp32), str(theirs), per_channel=True, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
    assert sorted(ops(ours)) == sorted(ops(theirs)) and "MatMulInteger" in ops(ours)
    x = pixels()
    got, want = run_onnx(str(ours), x, threads=1), run_onnx(str(theirs), x, threads=1)
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())
    assert embeddings_agreement(got, reference_embeddings(model, x))["cosine_min"] >= 0.999
    assert ours.stat().st_size <= 1.05 * theirs.stat().st_size  # int8 weights, as theirs (no shape metadata)


def test_external_data_source_gives_the_same_graph(fp32_graph, tmp_path):
    _, fp32 = fp32_graph
    external = tmp_path / "ext" / "vision.onnx"
    external.parent.mkdir()
    onnx.save_model(onnx.load(str(fp32)), str(external), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="vision.onnx.data", size_threshold=0)
    a = quantize_int8_streamed(fp32, tmp_path / "a.onnx")
    b = quantize_int8_streamed(external, tmp_path / "b.onnx")
    x = pixels(1)
    assert np.array_equal(run_onnx(str(a), x, threads=1), run_onnx(str(b), x, threads=1))


def test_op_types_read_without_weights(fp32_graph):
    _, fp32 = fp32_graph
    assert graph_op_types(fp32) == set(ops(fp32))
