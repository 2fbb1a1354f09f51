"""Dynamic int8 quantization of an ONNX graph's MatMul weights, one initializer at a time.

onnxruntime's `quantize_dynamic` holds three copies of the float model at once (the loaded proto, a
deep copy it saves for shape inference, and the reloaded copy): 3.6 GB for the ViT-L/14-336 vision graph,
the peak of a whole 7B export. This writes the same graph (the pattern `quantize_dynamic(per_channel=True,
weight_type=QInt8)` emits for MatMul, which ONNX Runtime fuses into MatMulIntegerToFloat when a session
loads it) while holding only the quantized weights: the source file is memory-mapped and its
initializers are parsed one by one from the protobuf wire format, inline or in an external `.data` file.

    x -> DynamicQuantizeLinear -> (x_q uint8, x_scale, x_zp)      one per distinct MatMul input
    MatMulInteger(x_q, W_q int8 [K, N], x_zp, W_zp int8 zeros [N]) -> Cast(float) -> Mul(x_scale * W_scale[N])

Weights: symmetric per output column, scale = max|W[:, n]| / 127 (ORT's int8 symmetric range), rounded
half to even. Only MatMuls whose second input is a 2-D float initializer are quantized; others stay.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .onnx_files import field_header, save_onnx

_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5  # ModelProto.graph, GraphProto.initializer
_LEN = 2  # wire type of length-delimited fields


def _varint(buf, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, field start incl. its key, value start, value end) for each field of a message."""
    pos = start
    while pos < end:
        first = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
            yield number, first, pos, pos
            continue
        if wire == _LEN:
            n, pos = _varint(buf, pos)
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, first, pos, pos + n
        pos += n


class StreamedModel:
    """An ONNX file read without loading its weights: the graph skeleton, then initializers one at a time."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "rb")
        self.buf = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        rest, graph_rest, self._initializers = [], [], []
        for number, first, start, end in _fields(self.buf, 0, len(self.buf)):
            if number != _MODEL_GRAPH:
                rest.append(self.buf[first:end])
                continue
            for sub, sub_first, sub_start, sub_end in _fields(self.buf, start, end):
                if sub == _GRAPH_INITIALIZER:
                    self._initializers.append((sub_start, sub_end))
                else:
                    graph_rest.append(self.buf[sub_first:sub_end])
        graph = b"".join(graph_rest)
        self.skeleton = onnx.ModelProto.FromString(b"".join(rest) + field_header(_MODEL_GRAPH, len(graph)) + graph)

    def initializers(self) -> Iterator[TensorProto]:
        for start, end in self._initializers:
            yield TensorProto.FromString(self.buf[start:end])

    def array(self, tensor: TensorProto) -> np.ndarray:
        """The tensor's values; external data is memory-mapped from its file, not read into memory."""
        if tensor.data_location != TensorProto.EXTERNAL:
            return numpy_helper.to_array(tensor)
        info = {e.key: e.value for e in tensor.external_data}
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        count = int(np.prod(tensor.dims)) if tensor.dims else 1
        location = self.path.parent / info["location"]
        if location.resolve().parent != self.path.parent.resolve():
            raise ValueError(f"{self.path}: external data outside the model's folder ({info['location']})")
        data = np.memmap(location, dtype=dtype, mode="r", offset=int(info.get("offset", 0)), shape=(count,))
        return data.reshape(tuple(tensor.dims))

    def close(self) -> None:
        self.buf.close()
        self._file.close()


def quantize_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 [K, N], float32 scale [N]): symmetric per output column."""
    absmax = np.abs(w).max(axis=0).astype(np.float32)
    scale = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale


def graph_op_types(path: str | Path) -> set[str]:
    """The op types of an ONNX file's graph, read without its weights."""
    model = StreamedModel(Path(path))
    try:
        return {n.op_type for n in model.skeleton.graph.node}
    finally:
        model.close()


def quantize_int8_streamed(src: str | Path, dst: str | Path) -> Path:
    """Write dst: src with every MatMul whose weight is a 2-D float initializer in dynamic int8."""
    model = StreamedModel(Path(src))
    try:
        proto = model.skeleton
        weights_of = {n.input[1] for n in proto.graph.node if n.op_type == "MatMul" and len(n.input) == 2}
        quantized = set()
        for tensor in model.initializers():
            if tensor.name in weights_of and tensor.data_type == TensorProto.FLOAT and len(tensor.dims) == 2:
                q, scale = quantize_weight(model.array(tensor))
                for array, suffix in ((q, "_quantized"), (scale, "_scale"), (np.zeros(q.shape[1], np.int8), "_zero_point")):
                    proto.graph.initializer.add().CopyFrom(numpy_helper.from_array(array, tensor.name + suffix))
                quantized.add(tensor.name)
            else:
                if tensor.data_location == TensorProto.EXTERNAL:
                    tensor = numpy_helper.from_array(np.array(model.array(tensor)), tensor.name)
                proto.graph.initializer.add().CopyFrom(tensor)
            del tensor
    finally:
        model.close()
    nodes, dynamic = [], set()
    for node in proto.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in quantized:
            nodes.append(node)
            continue
        x, w, y = node.input[0], node.input[1], node.output[0]
        if x not in dynamic:
            nodes.append(helper.make_node("DynamicQuantizeLinear", [x], [f"{x}_quantized", f"{x}_scale", f"{x}_zero_point"]))
            dynamic.add(x)
        name = node.name or y
        nodes += [
            helper.make_node("MatMulInteger", [f"{x}_quantized", f"{w}_quantized", f"{x}_zero_point", f"{w}_zero_point"],
                             [f"{y}_output_quantized"], name=f"{name}_quant"),
            helper.make_node("Mul", [f"{x}_scale", f"{w}_scale"], [f"{name}_quant_scales_mul:0"]),
            helper.make_node("Cast", [f"{y}_output_quantized"], [f"{y}_output_quantized_cast_output"], to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{y}_output_quantized_cast_output", f"{name}_quant_scales_mul:0"], [y]),
        ]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    save_onnx(proto, Path(dst))
    return Path(dst)
