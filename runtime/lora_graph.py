"""LoRA at run time: a low-rank branch beside each weight a LoRA changes, added to the loaded graph.

A LoRA layer's update to ``y = W x`` is ``m * alpha / rank * up @ (down @ x)`` (Hu et al. 2021, eq. 3). Instead of
adding ``up @ down`` into ``W`` (which would need the weights in float and a new compilation for every multiplier),
each targeted layer gets the product as a branch: ``y = W x + up_cat @ (s * (down_cat @ x))``, where the layers of
every active LoRA are stacked along the rank axis (``down_cat``, ``up_cat``) and ``s`` holds, per rank column, its
LoRA's multiplier (a graph input, ``MULTIPLIERS``) times its ``alpha / rank``. So:

- changing a multiplier changes an input: nothing is recompiled;
- changing which LoRAs are used rebuilds the branches: one graph update (:class:`LoraEdit` is a
  ``sdlite.engines.GraphEdit``; the engine applies it to its in-memory copy of the graph as it loads it);
- the base weight stays what the variant made it (fp16, int8, W8A8 with its activation quantizer): the branch
  reads the layer's float input (before any activation quantization or SmoothQuant scaling) and computes in
  float32, so its accuracy does not depend on the variant's.

Layers are found by the module path the exporter wrote into node names (``/unet/down_blocks.0/.../to_q/MatMul``,
the same in every precision and in optimum's exports): a linear layer is a ``MatMul`` or ``Gemm``, a convolution a
``Conv``; quantized ONNX graphs name theirs ``..._quant``. GEGLU projections that sdlite exports as two halves
(``ff.net.0.value``, ``ff.net.0.gate``) take the matching halves of ``up``. kohya's underscore names resolve both
as diffusers paths and as the original Stable Diffusion (LDM) ones (``input_blocks_4_1_...``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdlite.errors import InputError
from sdlite.lora_files import LoraLayer
from sdlite.onnx_wire import FLOAT, FLOAT16, ONNX_FLOATS, WireGraph, int_attribute, new_initializer, new_input, new_node

__all__ = ["MULTIPLIERS", "LoraEdit", "SlotLayers", "graph_layers", "kohya_names", "ldm_path"]

# The graph input holding each active LoRA's multiplier.
MULTIPLIERS = "sdlite_lora_multipliers"
# The first segment of a module path inside each component (what precedes it is the exporter's wrapper).
_ROOTS = {
    "unet": {"conv_in", "time_embedding", "down_blocks", "mid_block", "up_blocks", "conv_out", "add_embedding"},
    "text_encoder": {"text_model", "text_projection"},
    "text_encoder_2": {"text_model", "text_projection"},
}
# sdlite's split GEGLU halves -> the half of the original projection's output rows each computes.
_GEGLU_HALVES = {"value": 0, "gate": 1}
_LINEAR_NAME = re.compile(r"^(?P<path>.*)/(?P<op>MatMul|Gemm|Conv)$")
_QUANT_NAME = re.compile(r"^(?P<path>.*)/(?P<op>MatMul|Gemm|Conv)(_MatMul)?_quant$")
_BLOCK_LAYER = re.compile(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)$")
# diffusers' names -> LDM's, for a resnet's layers and for the layers outside the blocks.
_LDM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1"}
_LDM_RESNET |= {"conv_shortcut": "skip_connection", "norm1": "in_layers.0", "norm2": "out_layers.0"}
_LDM_TOP = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "conv_norm_out": "out.0"}
_LDM_TOP |= {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2"}
_OPENVINO_NAME = re.compile(r"^(?P<path>.*)/(?P<op>MatMul|Gemm|Conv)(/WithoutBiases)?$")


@dataclass
class SlotLayers:
    """One active LoRA's layers for one component: ``slot`` is its index in the multiplier input, ``rank`` caps
    each layer's rank (A1111's ``dyn``), ``alpha`` is the file's metadata alpha for layers without one."""

    name: str
    slot: int
    layers: list[LoraLayer]
    alpha: float | None = None
    rank: int | None = None


@dataclass
class _Site:
    """One layer of the graph a branch can be added to."""

    path: str  # module path inside the component (diffusers' names)
    kind: str  # "linear" or "conv"
    in_features: int
    out_features: int  # of the whole layer (both GEGLU halves)
    kernel: tuple[int, ...]
    rows: tuple[int, int] | None  # the output rows this graph layer computes (a GEGLU half), None for all
    handle: object  # where the engine's editor inserts the branch


@dataclass
class _Branch:
    # In the LoRA file's float type (float16 for most), widened only where the engine computes with them.
    down: np.ndarray  # (R, in) or (R, in, kh, kw)
    up: np.ndarray  # (rows, R)
    slots: np.ndarray  # (R,) int64
    scales: np.ndarray  # (R,) float32


@dataclass
class LoraEdit:
    """The branches of the active LoRAs for one component's graph, and their multipliers (``feeds``)."""

    component: str
    loras: list[SlotLayers]
    slots: int  # the length of the multiplier input (every active LoRA's, including those that leave this part)
    multipliers: np.ndarray = field(init=False)
    # Compiled graphs with branches are not written to OpenVINO's blob cache: every LoRA set would leave a
    # full copy of the U-Net there.
    cacheable = False

    def __post_init__(self):
        self.multipliers = np.ones(self.slots, np.float32)

    @property
    def extra_inputs(self) -> tuple[str, ...]:
        """Graph inputs the edit adds, which :meth:`feeds` fills."""
        return (MULTIPLIERS,)

    def feeds(self) -> dict[str, np.ndarray]:
        """The values of the inputs the edit added."""
        return {MULTIPLIERS: self.multipliers}

    def edit_onnx(self, model: bytes, path: Path) -> bytes:
        """The serialized ONNX ``model`` (from ``path``) with the branches added."""
        try:
            wire = WireGraph(model)
        except ValueError as exc:
            raise InputError(f"{path}: unreadable ONNX file ({exc})") from None
        sites = _onnx_sites(wire, self.component)
        branches = _plan(self, sites, path)
        _insert_onnx(wire, branches, self.slots)
        return wire.serialize()

    def edit_openvino(self, model, path: Path) -> None:
        """Add the branches to the ``openvino.Model`` read from ``path``, in place."""
        sites = _openvino_sites(model, self.component)
        _insert_openvino(model, _plan(self, sites, path), self.slots)


def graph_layers(path: Path, component: str) -> dict[str, tuple[str, int, int, tuple[int, ...]]]:
    """The layers a LoRA can change in the graph at ``path`` (ONNX or OpenVINO IR) of ``component``: module path ->
    (kind, in features, out features, kernel)."""
    if path.suffix == ".onnx":
        sites = _onnx_sites(WireGraph(path.read_bytes()), component)
    else:
        import openvino as ov

        sites = _openvino_sites(ov.Core().read_model(str(path)), component)
    return {site.path: (site.kind, site.in_features, site.out_features, site.kernel) for site in sites}


# --- Which graph layer each LoRA layer targets -------------------------------------------------------------------


def _module_path(node_path: str, component: str) -> str | None:
    """``/unet/down_blocks.0/attentions.0/proj_in`` -> ``down_blocks.0.attentions.0.proj_in``; None when the path
    holds none of the component's roots."""
    segments = [s for s in node_path.split("/") if s]
    for index, segment in enumerate(segments):
        if segment.split(".")[0] in _ROOTS[component]:
            return ".".join(segments[index:])
    return None


def _site(node_path: str, component: str, kind: str, weight: Sequence[int], handle: object) -> _Site | None:
    """A site from a layer's node path and its weight shape, (out, in[, kh, kw]); None for other layers."""
    path = _module_path(node_path, component)
    if path is None or len(weight) not in (2, 4):
        return None
    out_features, in_features = int(weight[0]), int(weight[1])
    rows = None
    head, _, tail = path.rpartition(".")
    if tail in _GEGLU_HALVES and head.endswith("ff.net.0"):
        half = _GEGLU_HALVES[tail]
        path, rows = f"{head}.proj", (half * out_features, (half + 1) * out_features)
        out_features *= 2
    return _Site(path, kind, in_features, out_features, tuple(int(k) for k in weight[2:]), rows, handle)


def ldm_path(path: str, layers_per_block: int, up_attention: set[int]) -> str | None:
    """A diffusers U-Net module path in the original Stable Diffusion (LDM) layout, as kohya's older LoRA files
    name layers (``down_blocks.1.attentions.0.proj_in`` -> ``input_blocks.4.1.proj_in``); None when it has none.
    ``up_attention`` holds the indices of the up blocks with attention layers (their upsampler comes third)."""
    if path in _LDM_TOP:
        return _LDM_TOP[path]
    per = layers_per_block + 1
    match = _BLOCK_LAYER.match(path)
    if match:
        blocks, block, kind, index, rest = match[1], int(match[2]), match[3], int(match[4]), match[5]
        if kind in ("downsamplers", "upsamplers"):
            if rest != "conv":
                return None
            if kind == "downsamplers":
                return f"input_blocks.{(block + 1) * per}.0.op"
            return f"output_blocks.{block * per + layers_per_block}.{2 if block in up_attention else 1}.conv"
        if kind == "resnets":
            rest = _LDM_RESNET.get(rest)
            if rest is None:
                return None
        number = 1 + block * per + index if blocks == "down_blocks" else block * per + index
        prefix = "input_blocks" if blocks == "down_blocks" else "output_blocks"
        return f"{prefix}.{number}.{0 if kind == 'resnets' else 1}.{rest}"
    match = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", path)
    if match:
        kind, index, rest = match[1], int(match[2]), match[3]
        if kind == "resnets":
            rest = _LDM_RESNET.get(rest)
            return None if rest is None else f"middle_block.{2 * index}.{rest}"
        return f"middle_block.1.{rest}"
    return None


def kohya_names(paths: Iterable[str], component: str) -> dict[str, str]:
    """kohya's underscore names -> module paths (``paths``): diffusers' paths, and for the U-Net the LDM ones too."""
    paths = set(paths)
    names = {path.replace(".", "_"): path for path in paths}
    if component == "unet":
        resnets = [int(m[1]) for p in paths if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", p))]
        layers_per_block = max(resnets, default=1) + 1
        up_attention = {int(m[1]) for p in paths if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", p))}
        for path in paths:
            ldm = ldm_path(path, layers_per_block, up_attention)
            if ldm is not None:
                names.setdefault(ldm.replace(".", "_"), path)
    return names


def _matrices(layer: LoraLayer, site: _Site, lora: str) -> tuple[np.ndarray, np.ndarray]:
    """The layer's down and up (in the file's float type) shaped for ``site``; a clear error when they do not fit."""
    down = np.asarray(layer.down)
    up = np.asarray(layer.up).reshape(layer.up.shape[0], -1)
    kernel = tuple(down.shape[2:]) or (1, 1)
    site_kernel = site.kernel or (1, 1)
    if (
        down.shape[1] != site.in_features
        or up.shape[0] != site.out_features
        or kernel != site_kernel
        or (site.kind == "linear" and kernel != (1, 1))
    ):
        found = f"{down.shape[1]} -> {up.shape[0]}" + (f" ({kernel[0]}x{kernel[1]})" if kernel != (1, 1) else "")
        wanted = f"{site.in_features} -> {site.out_features}"
        wanted += f" ({site_kernel[0]}x{site_kernel[1]})" if site_kernel != (1, 1) else ""
        raise InputError(
            f"LoRA {lora!r}: layer {layer.module!r} is {found}, the model's is {wanted} "
            "(a LoRA for another model family or size?)"
        )
    down = down.reshape(down.shape[0], -1) if site.kind == "linear" else down.reshape(down.shape[0], -1, *site_kernel)
    return down, up


def _plan(edit: LoraEdit, sites: list[_Site], graph: Path) -> list[tuple[_Site, _Branch]]:
    """Each site an active LoRA changes, with its stacked branch."""
    if not sites:
        raise InputError(f"{graph}: found no linear or convolution layers named by module path; cannot apply LoRAs")
    by_path: dict[str, list[_Site]] = {}
    for site in sites:
        by_path.setdefault(site.path, []).append(site)
    kohya = kohya_names((site.path for site in sites), edit.component)
    parts: dict[int, list[tuple[np.ndarray, np.ndarray, int, float]]] = {}
    for lora in edit.loras:
        for layer in lora.layers:
            path = kohya.get(layer.module) if layer.kohya else layer.module
            targets = by_path.get(path or "")
            if not targets:
                raise InputError(
                    f"LoRA {lora.name!r}: layer {layer.module!r} matches no {edit.component} layer of this model "
                    "(a LoRA for another model family?)"
                )
            down, up = _matrices(layer, targets[0], lora.name)
            rank = min(layer.rank, lora.rank or layer.rank)
            scale = layer.scale(lora.alpha)
            for site in targets:
                rows = up[site.rows[0] : site.rows[1]] if site.rows else up
                parts.setdefault(id(site), []).append((down[:rank], rows[:, :rank], lora.slot, scale))
    plan = []
    for site in sites:
        pieces = parts.get(id(site))
        if pieces:
            # One LoRA's matrices are used as they are (views of the file's arrays): no copy.
            down = pieces[0][0] if len(pieces) == 1 else np.concatenate([p[0] for p in pieces])
            up = np.ascontiguousarray(pieces[0][1] if len(pieces) == 1 else np.concatenate([p[1] for p in pieces], 1))
            slots = np.concatenate([np.full(len(p[0]), p[2], np.int64) for p in pieces])
            scales = np.concatenate([np.full(len(p[0]), p[3], np.float32) for p in pieces])
            plan.append((site, _Branch(down, up, slots, scales)))
    return plan


# --- ONNX (onnxruntime), at the protobuf wire level -----------------------------------------------------------


@dataclass
class _OnnxHandle:
    index: int  # of the node whose output the branch is added to
    node: object
    x: str  # the layer's float input
    float_type: int  # the graph's float type around the layer
    conv_attributes: list  # a convolution's attributes, raw


def _onnx_sites(wire: WireGraph, component: str) -> list[_Site]:
    producers = wire.producers()
    consumers = wire.consumers()
    sites = []
    for index, node in wire.nodes:
        plain = _LINEAR_NAME.match(node.name) if node.op_type in ("MatMul", "Gemm", "Conv") else None
        quant = _QUANT_NAME.match(node.name) if node.op_type in ("MatMulInteger", "ConvInteger") else None
        match = plain or quant
        if match is None or len(node.inputs) < 2 or node.inputs[1] not in wire.initializers:
            continue
        dims, weight_type = wire.initializers[node.inputs[1]]
        kind = "conv" if node.op_type.startswith("Conv") else "linear"
        if kind == "linear":
            # MatMul and quantized weights are (in, out); Gemm's (out, in) when it transposes them.
            if len(dims) != 2:
                continue
            dims = dims if node.op_type == "Gemm" and node.int_attribute("transB", 0) else dims[::-1]
        elif node.int_attribute("group", 1) != 1:
            continue
        x, out_index, out_node = node.inputs[0], index, node
        if quant:
            # DynamicQuantizeLinear(x) feeds the integer op; its result is dequantized by Cast then Mul.
            quantizer = producers.get(x)
            chain = [consumers.get(node.outputs[0], [])]
            if quantizer is None or quantizer.op_type != "DynamicQuantizeLinear" or len(chain[0]) != 1:
                continue
            x = quantizer.inputs[0]
            cast_index, cast = chain[0][0]
            scaled = consumers.get(cast.outputs[0], [])
            if cast.op_type != "Cast" or len(scaled) != 1 or scaled[0][1].op_type != "Mul":
                continue
            out_index, out_node = scaled[0]
        float_type = weight_type if weight_type in ONNX_FLOATS else FLOAT
        handle = _OnnxHandle(out_index, out_node, x, float_type, node.attributes() if kind == "conv" else [])
        site = _site(match["path"], component, kind, dims, handle)
        if site is not None:
            sites.append(site)
    return sites


def _insert_onnx(wire: WireGraph, plan: list[tuple[_Site, _Branch]], slots: int) -> None:
    if not plan:
        return
    wire.append(new_input(MULTIPLIERS, FLOAT, (slots,)))
    for number, (site, branch) in enumerate(plan):
        handle: _OnnxHandle = site.handle
        name = f"sdlite_lora/{number}"
        conv = site.kind == "conv"
        shape = (1, -1, 1, 1) if conv else (-1,)
        # onnxruntime's CPU kernels compute in float32.
        down = (branch.down if conv else branch.down.T).astype(np.float32)
        up = (branch.up.reshape(*branch.up.shape, 1, 1) if conv else branch.up.T).astype(np.float32)
        wire.append(new_initializer(f"{name}/down", down))
        wire.append(new_initializer(f"{name}/up", up))
        wire.append(new_initializer(f"{name}/slots", branch.slots.reshape(shape)))
        wire.append(new_initializer(f"{name}/scales", branch.scales.reshape(shape)))
        out = handle.node.outputs[0]
        handle.node.outputs[0] = f"{name}/base"
        half = handle.float_type == FLOAT16
        to_float = [int_attribute("to", FLOAT)]
        nodes = [handle.node.encode()]
        x = handle.x
        if half:
            nodes.append(new_node("Cast", [x], [f"{name}/x"], to_float))
            x = f"{name}/x"
        op = "Conv" if conv else "MatMul"
        nodes += [
            new_node(op, [x, f"{name}/down"], [f"{name}/low"], handle.conv_attributes),
            new_node("Gather", [MULTIPLIERS, f"{name}/slots"], [f"{name}/multipliers"], [int_attribute("axis", 0)]),
            new_node("Mul", [f"{name}/multipliers", f"{name}/scales"], [f"{name}/s"]),
            new_node("Mul", [f"{name}/low", f"{name}/s"], [f"{name}/scaled"]),
            new_node(op, [f"{name}/scaled", f"{name}/up"], [f"{name}/delta"]),
        ]
        delta = f"{name}/delta"
        if half:
            nodes.append(new_node("Cast", [delta], [f"{name}/delta16"], [int_attribute("to", FLOAT16)]))
            delta = f"{name}/delta16"
        nodes.append(new_node("Add", [f"{name}/base", delta], [out]))
        wire.replace(handle.index, b"".join(nodes))


# --- OpenVINO ---------------------------------------------------------------------------------------------


def _float_source(output):
    """The float tensor a layer reads before the variant's activation quantization (NNCF's FakeQuantize) and
    SmoothQuant scaling (a Multiply named ``nncf_smooth_quant``)."""
    while True:
        node = output.get_node()
        kind = node.get_type_name()
        if kind == "FakeQuantize" or (kind == "Multiply" and "nncf_smooth_quant" in node.get_friendly_name()):
            output = node.input_value(0)
        else:
            return output


def _openvino_sites(model, component: str) -> list[_Site]:
    ops = list(model.get_ordered_ops())
    by_name = {op.get_friendly_name(): op for op in ops}
    sites = []
    for op in ops:
        kind = {"MatMul": "linear", "Convolution": "conv"}.get(op.get_type_name())
        match = _OPENVINO_NAME.match(op.get_friendly_name()) if kind else None
        if match is None or not op.input_value(1).get_partial_shape().is_static:
            continue
        weight = list(op.input_value(1).get_shape())
        if kind == "linear":
            attributes = op.get_attributes()
            if len(weight) != 2 or attributes.get("transpose_a"):
                continue
            weight = weight if attributes.get("transpose_b") else weight[::-1]
        # The node named after the layer gives its output (with the bias when it has one).
        out = by_name.get(f"{match['path']}/{match['op']}", op)
        handle = (out.output(0), op, op.get_attributes() if kind == "conv" else None)
        site = _site(match["path"], component, kind, weight, handle)
        if site is not None:
            sites.append(site)
    return sites


def _weights(array: np.ndarray):
    """A branch's weights as a float32 input: the array shared, not copied, and a float16 one kept in float16 with
    a conversion after it, which OpenVINO's CPU plugin folds into its matrix kernels (the weights stay half size)."""
    import openvino as ov
    import openvino.opset13 as ops

    constant = ops.constant(np.ascontiguousarray(array), shared_memory=True)
    return constant if array.dtype == np.float32 else ops.convert(constant, ov.Type.f32)


def _insert_openvino(model, plan: list[tuple[_Site, _Branch]], slots: int) -> None:
    if not plan:
        return
    import openvino as ov
    import openvino.opset13 as ops

    multipliers = ops.parameter([slots], ov.Type.f32, name=MULTIPLIERS)
    multipliers.output(0).get_tensor().set_names({MULTIPLIERS})
    # Sites with the same LoRAs at the same alpha / rank share one per-rank scale (fewer nodes, less memory).
    scales = {}
    for site, branch in plan:
        out, layer, conv = site.handle
        # Read now, not when the sites were found: a layer fed by another changed layer reads its new output.
        x = _float_source(layer.input_value(0))
        targets = list(out.get_target_inputs())
        if x.get_element_type() != ov.Type.f32:
            x = ops.convert(x, ov.Type.f32).output(0)
        shape = (1, -1, 1, 1) if conv is not None else (-1,)
        key = (shape, branch.slots.tobytes(), branch.scales.tobytes())
        if key not in scales:
            scales[key] = ops.multiply(
                ops.gather(multipliers, ops.constant(branch.slots.reshape(shape)), ops.constant(np.int64(0))),
                ops.constant(branch.scales.reshape(shape)),
            )
        scale = scales[key]
        down, up = _weights(branch.down), _weights(branch.up.reshape(*branch.up.shape, 1, 1) if conv else branch.up)
        if conv is not None:
            pads = (conv["pads_begin"], conv["pads_end"])
            low = ops.convolution(x, down, conv["strides"], *pads, conv["dilations"])
            delta = ops.convolution(ops.multiply(low, scale), up, [1, 1], [0, 0], [0, 0], [1, 1])
        else:
            low = ops.matmul(x, down, False, True)
            delta = ops.matmul(ops.multiply(low, scale), up, False, True)
        if out.get_element_type() != ov.Type.f32:
            delta = ops.convert(delta, out.get_element_type())
        total = ops.add(out, delta)
        for target in targets:
            target.replace_source_output(total.output(0))
        names = out.get_names()
        if names:
            out.get_tensor().set_names(set())
            total.output(0).get_tensor().set_names(names)
    model.add_parameters([multipliers])
    model.validate_nodes_and_infer_types()
