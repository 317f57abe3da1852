"""ONNX fp16 and int8 variants of a part, written one weight at a time.

onnxruntime's float16 converter and dynamic quantizer work on the whole model, weights included, and copy it on
the way (11.4 GB peak for the SD 1.5 U-Net's int8 variant, 8.2 GB for fp16). Here the graph is loaded without its
weights and rewritten; then each weight is read from the fp32 export, converted and written to the variant's
external-data file in turn, so the process holds one weight at a time. The numbers are onnxruntime's own:

- fp16: onnxruntime's float16 converter rewrites the graph (fp16 arithmetic, fp32 inputs and outputs, Casts
  around the ops it keeps in fp32) and decides which weights become fp16; they are converted with its value
  conversion (small magnitudes and overflows clamped as it clamps them).
- int8: the graph ``quantize_dynamic(weight_type=QInt8)`` writes, built node by node: a weight-bearing MatMul
  (and Gemm, first split into MatMul + Add) or Conv becomes ``DynamicQuantizeLinear`` on its input (once per
  tensor) -> ``MatMulInteger``/``ConvInteger`` -> ``Cast`` -> ``Mul`` by the product of the two scales, with
  the weight quantized per tensor to symmetric int8 by onnxruntime's ``quantize_data``; an embedding table read
  by ``Gather`` is stored as asymmetric uint8 and dequantized after the lookup. Node and tensor names are
  onnxruntime's too (the runtime's LoRA branches find their layers by them).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import ExternalDataInfo, uses_external_data

from sdlite.convert.onnx_export import ExternalDataWriter
from sdlite.layout import GRAPH_FILES, graph_files

# onnxruntime's float16 converter's defaults, used for the graph and the weights alike.
_FP16_MIN_POSITIVE, _FP16_MAX_FINITE = 5.96e-08, 65504.0


class _Weights:
    """Reads a graph's initializers one at a time: inline ones from the graph, external ones from their file."""

    def __init__(self, folder: Path):
        self.folder = folder

    def read(self, tensor: TensorProto) -> np.ndarray:
        """The initializer's values (a fresh array; nothing of the file stays mapped)."""
        if not uses_external_data(tensor):
            return numpy_helper.to_array(tensor)
        info = ExternalDataInfo(tensor)
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).newbyteorder("<")
        count = int(np.prod(tensor.dims, dtype=np.int64))
        array = np.fromfile(self.folder / info.location, dtype=dtype, count=count, offset=info.offset or 0)
        return array.reshape(tuple(tensor.dims))


@contextmanager
def _written(model: onnx.ModelProto, target: Path, external: bool):
    """Yield ``store(tensor, array)``, which gives initializer ``tensor`` the values ``array`` (in the
    external-data file when ``external`` and the tensor is over 1 KB, as onnx splits them; inline otherwise);
    the graph is saved as ``target`` at the end."""
    with ExternalDataWriter(target.parent) if external else nullcontext() as writer:

        def store(tensor: TensorProto, array: np.ndarray) -> None:
            payload = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
            del tensor.dims[:]
            tensor.dims.extend(array.shape)
            tensor.ClearField("raw_data")
            del tensor.external_data[:]
            tensor.data_location = TensorProto.DEFAULT
            if writer is not None and len(payload) > 1024:
                writer.put(tensor, payload)
            else:
                tensor.raw_data = payload

        yield store
    onnx.save_model(model, str(target))


def _header_value_info(tensor: TensorProto) -> onnx.ValueInfoProto:
    """A value info from an initializer's header alone (its data may be in a file not read)."""
    return helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))


def onnx_fp16(base: Path, out_dir: Path) -> list[Path]:
    """fp16 weights and arithmetic, fp32 inputs and outputs, from the fp32 graph ``base``."""
    from unittest import mock

    from onnxruntime.transformers import float16

    out_dir.mkdir(parents=True, exist_ok=True)
    # The converter needs every tensor's type; shape inference on the file works above protobuf's 2 GB limit.
    # The inferred copy sits next to the source so that its relative external-data paths still resolve.
    inferred = base.with_name(".inferred.onnx")
    try:
        onnx.shape_inference.infer_shapes_path(str(base), str(inferred))
        model = onnx.load(str(inferred), load_external_data=False)
    finally:
        inferred.unlink(missing_ok=True)
    originals = {t.name: _copy_header(t) for t in model.graph.initializer if uses_external_data(t)}
    # The converter types an initializer from its values; external ones are typed from their headers, and their
    # values converted below, one at a time.
    with mock.patch.object(float16, "make_value_info_from_tensor", _header_value_info):
        model = float16.convert_float_to_float16(
            model,
            min_positive_val=_FP16_MIN_POSITIVE,
            max_finite_val=_FP16_MAX_FINITE,
            keep_io_types=True,
            disable_shape_infer=True,
        )
    weights = _Weights(base.parent)
    target = out_dir / GRAPH_FILES["onnx"]
    with _written(model, target, external=bool(originals)) as store:
        for tensor in model.graph.initializer:
            if tensor.name not in originals:
                continue
            array = weights.read(originals[tensor.name])
            if tensor.data_type == TensorProto.FLOAT16 and array.dtype == np.float32:
                # Flat, as the converter passes them (its indexing is several times slower on n-d arrays).
                flat = float16.convert_np_to_float16(array.ravel(), _FP16_MIN_POSITIVE, _FP16_MAX_FINITE)
                array = flat.reshape(array.shape)
            store(tensor, array)
    return graph_files(target)


def _copy_header(tensor: TensorProto) -> TensorProto:
    header = TensorProto()
    header.CopyFrom(tensor)
    return header


def _attribute(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return helper.get_attribute_value(attribute)
    return default


def _is_plain_gemm(node: onnx.NodeProto) -> bool:
    """A Gemm that is a MatMul plus a bias (the form onnxruntime splits before quantizing)."""
    alpha, beta = _attribute(node, "alpha", 1.0), _attribute(node, "beta", 1.0)
    return alpha == 1.0 and beta == 1.0 and not _attribute(node, "transA", 0)


class _Int8Graph:
    """Builds the dynamically quantized graph node by node (see the module docstring)."""

    def __init__(self, graph: onnx.GraphProto, weights: _Weights):
        self.graph, self.weights = graph, weights
        self.initializers = {t.name: t for t in graph.initializer}
        self.nodes: list[onnx.NodeProto] = []
        # float tensor name -> (quantized name, scale name, zero point name)
        self.quantized: dict[str, tuple[str, str, str]] = {}
        self.dequantized: set[str] = set()
        # new initializer name -> a function making its values when the graph is written
        self.values: dict[str, Callable[[], np.ndarray]] = {}
        self.gather_outputs: set[str] = set()

    def _float_weight(self, name: str) -> TensorProto | None:
        tensor = self.initializers.get(name)
        return tensor if tensor is not None and tensor.data_type == TensorProto.FLOAT else None

    def _quantize_weight(self, name: str, qtype: int, symmetric: bool, transpose: bool = False) -> tuple[str, str, str]:
        """Names of the quantized weight, its scale and zero point; the values are computed when written."""
        stored = f"{name}_Transposed" if transpose else name
        names = (f"{stored}_quantized", f"{stored}_scale", f"{stored}_zero_point")
        if names[0] in self.values:
            return names
        tensor = _copy_header(self.initializers[name])  # the graph's own list is replaced by finish()
        cache: dict[str, np.ndarray] = {}

        def compute() -> None:
            from onnxruntime.quantization.quant_utils import quantize_data

            data = self.weights.read(tensor)
            if transpose:
                data = data.T
            zero_point, scale, quantized = quantize_data(data.flatten(), qtype, symmetric)
            cache[names[0]] = np.asarray(quantized).reshape(data.shape)
            cache[names[1]] = np.asarray(scale, dtype=np.float32).reshape(())
            cache[names[2]] = np.asarray(zero_point).reshape(())

        def value(key: str) -> Callable[[], np.ndarray]:
            def get() -> np.ndarray:
                if key not in cache:
                    compute()
                return cache.pop(key)

            return get

        for key in names:
            self.values[key] = value(key)
        return names

    def _activation(self, name: str) -> tuple[str, str, str]:
        """The dynamically quantized form of float tensor ``name`` (one DynamicQuantizeLinear per tensor)."""
        if name not in self.quantized:
            names = (f"{name}_quantized", f"{name}_scale", f"{name}_zero_point")
            self.nodes.append(helper.make_node("DynamicQuantizeLinear", [name], list(names), f"{name}_QuantizeLinear"))
            self.quantized[name] = names
        return self.quantized[name]

    def _dequantize_inputs(self, node: onnx.NodeProto) -> None:
        """Float consumers of a quantized Gather output read it dequantized (once)."""
        for name in node.input:
            if name in self.gather_outputs and name not in self.dequantized:
                q, scale, zero_point = self.quantized[name]
                self.nodes.append(
                    helper.make_node("DequantizeLinear", [q, scale, zero_point], [name], f"{name}_DequantizeLinear")
                )
                self.dequantized.add(name)

    def _integer_op(self, node: onnx.NodeProto, op_type: str, weight: tuple[str, str, str], output: str) -> None:
        """``op_type`` (MatMulInteger/ConvInteger) on the quantized input and ``weight``, scaled back to float."""
        x, x_scale, x_zero = self._activation(node.input[0])
        w, w_scale, w_zero = weight
        name = f"{node.name}_quant"
        integer_out = f"{node.output[0]}_output_quantized"
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute} if op_type == "ConvInteger" else {}
        self.nodes.append(helper.make_node(op_type, [x, w, x_zero, w_zero], [integer_out], name, **attributes))
        cast_out = f"{integer_out}_cast_output"
        cast = helper.make_node("Cast", [integer_out], [cast_out], f"{integer_out}_cast", to=TensorProto.FLOAT)
        self.nodes.append(cast)
        scales = f"{name}_scales_mul:0"
        self.nodes.append(helper.make_node("Mul", [x_scale, w_scale], [scales], f"{name}_scales_mul"))
        self.nodes.append(helper.make_node("Mul", [cast_out, scales], [output], f"{name}_output_scale_mul"))

    def add(self, node: onnx.NodeProto) -> None:
        """Append ``node``, quantized where onnxruntime's dynamic quantization quantizes it."""
        self._dequantize_inputs(node)
        op = node.op_type
        if op == "Gemm" and self._float_weight(node.input[1]) is not None and _is_plain_gemm(node):
            return self._gemm(node)
        if op == "MatMul" and self._float_weight(node.input[1]) is not None:
            weight = self._quantize_weight(node.input[1], TensorProto.INT8, symmetric=True)
            return self._integer_op(node, "MatMulInteger", weight, node.output[0])
        if op == "Conv" and self._float_weight(node.input[1]) is not None:
            weight = self._quantize_weight(node.input[1], TensorProto.INT8, symmetric=True)
            if len(node.input) < 3:
                return self._integer_op(node, "ConvInteger", weight, node.output[0])
            out = node.output[0]
            scaled = f"{out}quant_scaled_output"
            self._integer_op(node, "ConvInteger", weight, scaled)
            shape_name = f"{out}_bias_reshape_shape"
            rank = len(self.initializers[node.input[1]].dims)
            shape = np.ones(rank, dtype=np.int64)
            shape[1] = -1
            self.values[shape_name] = lambda shape=shape: shape
            self.nodes.append(helper.make_node("Reshape", [node.input[2], shape_name], [f"{out}_bias_reshape_output"]))
            self.nodes.append(helper.make_node("Add", [scaled, f"{out}_bias_reshape_output"], [out], f"{out}_bias_add"))
            return None
        if op == "Gather" and self._float_weight(node.input[0]) is not None:
            q, scale, zero_point = self._quantize_weight(node.input[0], TensorProto.UINT8, symmetric=False)
            out = node.output[0]
            gathered = f"{out}_quantized"
            axis = _attribute(node, "axis", 0)
            self.nodes.append(helper.make_node("Gather", [q, *node.input[1:]], [gathered], node.name, axis=axis))
            self.quantized[out] = (gathered, scale, zero_point)
            self.gather_outputs.add(out)
            return None
        self.nodes.append(node)
        return None

    def _gemm(self, node: onnx.NodeProto) -> None:
        """Gemm as MatMul (weight transposed when transB) + Add, the MatMul then quantized."""
        transpose = bool(_attribute(node, "transB", 0))
        weight = self._quantize_weight(node.input[1], TensorProto.INT8, symmetric=True, transpose=transpose)
        has_bias = len(node.input) > 2 and node.input[2]
        output = f"{node.output[0]}_MatMul" if has_bias else node.output[0]
        matmul = helper.make_node("MatMul", [node.input[0], weight[0]], [output], f"{node.name}_MatMul")
        self._integer_op(matmul, "MatMulInteger", weight, output)
        if has_bias:
            self.nodes.append(helper.make_node("Add", [output, node.input[2]], list(node.output), f"{node.name}_Add"))

    def finish(self) -> None:
        """Dequantize graph outputs that are quantized Gather outputs, and replace the graph's nodes and
        initializers (the float weights that were quantized are dropped)."""
        for output in self.graph.output:
            self._dequantize_inputs(helper.make_node("Identity", [output.name], ["_"]))
        used = {name for node in self.nodes for name in node.input} | {o.name for o in self.graph.output}
        kept = [t for t in self.graph.initializer if t.name in used]
        self.graph.ClearField("node")
        self.graph.node.extend(self.nodes)
        self.graph.ClearField("initializer")
        self.graph.initializer.extend(kept)
        for name in self.values:
            self.graph.initializer.add().name = name


def onnx_int8(base: Path, out_dir: Path) -> list[Path]:
    """int8 weights with activations quantized per call, from the fp32 graph ``base``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(base), load_external_data=False)
    weights = _Weights(base.parent)
    external = any(uses_external_data(t) for t in model.graph.initializer)
    builder = _Int8Graph(model.graph, weights)
    for node in model.graph.node:
        builder.add(node)
    originals = {t.name: _copy_header(t) for t in model.graph.initializer if uses_external_data(t)}
    builder.finish()
    target = out_dir / GRAPH_FILES["onnx"]
    with _written(model, target, external) as store:
        for tensor in model.graph.initializer:
            if tensor.name in builder.values:
                store(tensor, builder.values[tensor.name]())
            elif tensor.name in originals:
                store(tensor, weights.read(originals[tensor.name]))
    return graph_files(target)
