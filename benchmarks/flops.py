"""Counted U-Net arithmetic: 2 x multiply-accumulates of every Conv, MatMul and Gemm node in the ONNX graph.

Shapes come from shape inference (onnxruntime's symbolic one, else ``onnx.shape_inference``) with the
graph's inputs fixed to the benchmark's size, so the count is exact for those node types at that size;
element-wise work (norms, activations, softmax) is left out, a few percent of the total for Stable
Diffusion. Attention's two matrix products are MatMul nodes and are counted (torch's FlopCounterMode misses
them under scaled_dot_product_attention). Needs the ``onnx`` package (convert extra); without it the count
is unknown (None).
"""

from __future__ import annotations

import math
from pathlib import Path

COUNTED_OPS = ("Conv", "MatMul", "Gemm")


def _dims(value_type) -> list[int] | None:
    shape = value_type.tensor_type.shape
    dims = [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]
    return None if any(d is None for d in dims) else dims


def _attribute(node, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return attr.i if attr.type == attr.INT else list(attr.ints)
    return default


def _node_flops(node, shapes: dict[str, list[int]]) -> int | None:
    """2 x MACs of one node, or None when a shape it needs is unknown."""
    inputs = [shapes.get(name) for name in node.input[:2]]
    output = shapes.get(node.output[0])
    if any(s is None for s in inputs) or output is None:
        return None
    if node.op_type == "Conv":
        weight = inputs[1]  # (C_out, C_in / group, kH, kW)
        # Every output element takes C_in/group x kernel-area multiply-adds.
        return 2 * math.prod(output) * math.prod(weight[1:])
    if node.op_type == "Gemm":
        a = inputs[0]
        k = a[0] if _attribute(node, "transA", 0) else a[1]
        return 2 * math.prod(output) * k
    a = inputs[0]  # MatMul: numpy semantics, K is the last axis of A (a 1-D A is a row vector)
    return 2 * math.prod(output) * a[-1]


def _infer(model):
    """Shapes for every value. onnxruntime's symbolic inference follows shapes computed at run time (the
    timestep broadcast to the batch through Shape/Where/Expand) that ``onnx.shape_inference`` leaves unknown."""
    import onnx

    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # any failure there: onnx's own inference, which may leave some shapes unknown
        return onnx.shape_inference.infer_shapes(model, data_prop=True)


def unet_flops(onnx_path: Path, batch: int, height: int, width: int, context_length: int = 77) -> int | None:
    """FLOPs of one U-Net call on ``batch`` latents of an image of ``height`` x ``width`` pixels.

    ``onnx_path`` may also be an OpenVINO IR (``.xml``), counted by OpenVINO's shape inference. Returns None
    when onnx is not installed (for an ONNX graph) or some counted node's shape cannot be inferred."""
    call = (batch, height, width, context_length)
    if onnx_path.suffix == ".xml":
        return _openvino_flops(onnx_path, _ir_input_shapes(onnx_path, call))
    try:
        import onnx
    except ImportError:
        return None
    # Weights are not needed for shapes: load the graph alone, which keeps a 3.4 GB U-Net cheap to read.
    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = model.graph
    initializers = {init.name: list(init.dims) for init in graph.initializer}
    concrete = {}
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        target = None if value.name in initializers else _call_shape(value.name, [d.dim_value for d in dims], call)
        if target:  # a rank-0 timestep has nothing to fix
            concrete[value.name] = target
            for dim, size in zip(dims, target, strict=True):
                dim.ClearField("dim_param")
                dim.dim_value = size
    # Exporters leave symbolic intermediate shapes behind; drop them so inference recomputes concrete ones.
    del graph.value_info[:]
    inferred = _infer(model)
    shapes = dict(initializers)
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        dims = _dims(value.type)
        if dims is not None:
            shapes[value.name] = dims
    total = 0
    for node in inferred.graph.node:
        if node.op_type in COUNTED_OPS:
            flops = _node_flops(node, shapes)
            if flops is None:
                return _openvino_flops(onnx_path, concrete)
            total += flops
    return total


def _call_shape(name: str, dims: list[int], call: tuple[int, int, int, int]) -> list[int] | None:
    """The shape U-Net input ``name`` (its graph dims, 0 where symbolic) takes for one call of ``call`` =
    (batch, height, width, context length); None for an input it does not know."""
    batch, height, width, context_length = call
    if name == "sample":  # channels from the graph: 4, or 9 for inpainting
        return [batch, dims[1] or 4, height // 8, width // 8]
    if name == "encoder_hidden_states":
        return [batch, context_length, dims[2]]
    if name == "timestep":
        return [batch] if len(dims) == 1 else []
    if name in ("text_embeds", "time_ids", "timestep_cond"):  # SDXL's added conditioning, LCM's guidance
        return [batch, dims[1]]
    return None


def _ir_input_shapes(xml: Path, call: tuple[int, int, int, int]) -> dict[str, list[int]]:
    import openvino as ov

    shapes = {}
    for port in ov.Core().read_model(str(xml)).inputs:
        dims = [d.get_length() if d.is_static else 0 for d in port.get_partial_shape()]
        target = _call_shape(port.get_any_name(), dims, call)
        if target is not None:
            shapes[port.get_any_name()] = target
    return shapes


def _openvino_flops(onnx_path: Path, input_shapes: dict[str, list[int]]) -> int | None:
    """The same count from OpenVINO's shape inference, which follows what onnx's cannot (sliced attention's
    run-time Slice bounds, the timestep embedding's Cast): ONNX Gemm arrives as MatMul, Conv as Convolution."""
    import openvino as ov

    model = ov.Core().read_model(str(onnx_path))
    model.reshape({name: ov.PartialShape(dims) for name, dims in input_shapes.items()})
    total = 0
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind not in ("Convolution", "GroupConvolution", "MatMul"):
            continue
        output = op.get_output_partial_shape(0)
        a, b = (op.get_input_partial_shape(i) for i in (0, 1))
        if not (output.is_static and a.is_static and b.is_static):
            return None
        out, a, b = (list(s.to_shape()) for s in (output, a, b))
        if kind == "Convolution":  # weights (C_out, C_in, kH, kW)
            total += 2 * math.prod(out) * math.prod(b[1:])
        elif kind == "GroupConvolution":  # weights (groups, C_out / g, C_in / g, kH, kW)
            total += 2 * math.prod(out) * math.prod(b[2:])
        else:
            k = a[-2] if op.get_attributes().get("transpose_a") and len(a) > 1 else a[-1]
            total += 2 * math.prod(out) * k
    return total
