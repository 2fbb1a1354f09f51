"""The device's own ceilings, measured with the runtimes the bundle uses (ONNX Runtime, all threads asked for):
memory bandwidth (a reduction over a buffer much larger than the caches) and matmul throughput in fp32 and
int8. Decode speed is then compared with bandwidth / weight bytes per token, vision with matmul peak."""

from __future__ import annotations

import statistics
import time

import numpy as np


def _session(graph, threads: int):
    import onnx

    from ..onnx_session import ort_session

    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    return ort_session(model.SerializeToString(), threads, quiet=True)


def _median_seconds(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memory_bandwidth_gbs(threads: int, mib: int = 512, runs: int = 5) -> float:
    """The faster of a memcpy (bytes read + written) and ONNX Runtime's threaded ReduceSum (bytes read): on a
    2-core VM the reduction is compute-bound at ~10 GB/s while memcpy moves ~20."""
    from onnx import TensorProto, helper

    n = mib * 2**20 // 4
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0)], "bandwidth",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    sess = _session(graph, threads)
    x = np.ones(n, np.float32)
    reduce_gbs = x.nbytes / _median_seconds(lambda: sess.run(None, {"x": x}), runs) / 1e9
    y = np.empty_like(x)
    copy_gbs = 2 * x.nbytes / _median_seconds(lambda: np.copyto(y, x), runs) / 1e9
    return max(reduce_gbs, copy_gbs)


def matmul_gflops(threads: int, int8: bool = False, m: int = 576, k: int = 4096, n: int = 4096, runs: int = 5) -> float:
    """[m, k] x [k, n] (LLaVA's projector shape at 576 image tokens) in fp32 MatMul or int8 MatMulInteger."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if int8:
        w = numpy_helper.from_array(rng.integers(-127, 127, (k, n), dtype=np.int8), "w")
        node = helper.make_node("MatMulInteger", ["x", "w"], ["y"])
        x = rng.integers(0, 255, (m, k), dtype=np.uint8)
        x_type, y_type = TensorProto.UINT8, TensorProto.INT32
    else:
        w = numpy_helper.from_array(rng.standard_normal((k, n), dtype=np.float32), "w")
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
        x = rng.standard_normal((m, k), dtype=np.float32)
        x_type, y_type = TensorProto.FLOAT, TensorProto.FLOAT
    graph = helper.make_graph([node], "matmul", [helper.make_tensor_value_info("x", x_type, [m, k])],
                              [helper.make_tensor_value_info("y", y_type, [m, n])], initializer=[w])
    sess = _session(graph, threads)
    seconds = _median_seconds(lambda: sess.run(None, {"x": x}), runs)
    return 2 * m * k * n / seconds / 1e9


def measure(threads: int, quick: bool = False) -> dict:
    runs = 3 if quick else 7
    return {
        "memory_bandwidth_gbs": memory_bandwidth_gbs(threads, 256 if quick else 512, runs),
        "matmul_fp32_gflops": matmul_gflops(threads, False, runs=runs),
        "matmul_int8_gops": matmul_gflops(threads, True, runs=runs),
    }


def vit_flops(image_size: int, patch: int, width: int, mlp: int, layers: int, proj_in: int, proj_hidden: int,
              proj_out: int, n_tokens_out: int) -> float:
    """Multiply-adds x 2 of one image through a CLIP ViT (up to the layers used) and a 2-layer MLP projector."""
    n = (image_size // patch) ** 2 + 1
    embed = 2 * n * (3 * patch * patch) * width
    per_layer = 2 * n * width * (4 * width) + 2 * 2 * n * n * width + 2 * 2 * n * width * mlp
    projector = 2 * n_tokens_out * (proj_in * proj_hidden + proj_hidden * proj_out)
    return embed + layers * per_layer + projector
