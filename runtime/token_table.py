"""New rows in a text encoder's token-embedding table, added when the graph loads (textual inversion).

The exported text encoder looks token ids up in a (vocabulary, width) table: a ``Gather`` whose data is
that table and whose indices come from the ``input_ids`` input. Extending the table in the loaded graph,
and giving an embedding's vectors the ids that follow the vocabulary, lets the unchanged file encode
prompts that use the embedding: no export, no second text encoder on disk, and folders written by optimum
work as well as sdlite's own. The file is never modified: :class:`TokenRows` is a graph edit
(``sdlite.engines.GraphEdit``) that the engine applies to its in-memory copy as it loads the graph.

Every precision keeps its own table and gets ``Concat(table, rows)`` in front of the lookup:

- a float table (fp32, fp16 weights, OpenVINO's fp16 and int8 IR, whose decompression yields a float
  table before the lookup): the rows, in the table's type, are concatenated directly;
- an integer table that is dequantized *after* the lookup (onnxruntime's dynamic int8 quantization:
  ``Gather`` on the int8 table, then ``DequantizeLinear``): the per-tensor dequantization moves in front
  of the lookup (dequantize(table)[ids] equals dequantize(table[ids]) exactly) and float rows are
  concatenated to the dequantized table, so the vectors are not rounded to the table's int8 grid.

OpenVINO graphs are edited with OpenVINO's own graph API. onnxruntime has no graph-editing API and the
runtime does not depend on the ``onnx`` package, so ONNX files are edited at the protobuf wire level: a
few dozen lines that read the graph's nodes, inputs and initializer headers, and write back the same
bytes with the lookup rewired, two or three nodes and one initializer added.

Only the token lookup changes. CLIP's ``pooler_output`` picks the eos position with ``argmax(input_ids)``
in configs that predate transformers' ``eos_token_id``; with new ids above the vocabulary it then points at
an embedding instead. Stable Diffusion 1.x and 2.x condition on ``last_hidden_state`` and hidden states only.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sdlite.errors import InputError

__all__ = ["TokenRows", "extend_onnx_token_table", "extend_openvino_token_table"]

INPUT_IDS = "input_ids"
# Ops that pass token ids on unchanged in value (exports reshape or cast input_ids before the lookup).
_ID_PASSTHROUGH = {"Reshape", "Cast", "Convert", "Flatten", "Unsqueeze", "Squeeze", "Identity"}


@dataclass(frozen=True)
class TokenRows:
    """Rows to append to the token table: the table must hold exactly ``first_id`` rows of ``vectors``'
    width, so that the new rows get ids ``first_id``, ``first_id + 1``, ..."""

    first_id: int
    vectors: np.ndarray

    def __post_init__(self):
        if self.vectors.ndim != 2 or not len(self.vectors):
            raise ValueError(f"token rows must be a non-empty (N, width) array, got shape {self.vectors.shape}")

    def edit_onnx(self, model: bytes, path: Path) -> bytes:
        """The serialized ONNX ``model`` (from ``path``) with these rows in its token table."""
        return extend_onnx_token_table(model, self, path)

    def edit_openvino(self, model, path: Path) -> None:
        """Append these rows to the token table of the OpenVINO ``model`` (read from ``path``), in place."""
        extend_openvino_token_table(model, self, path)


def _check_table(shape: tuple[int, ...], rows: TokenRows, graph: object) -> None:
    vocabulary, width = shape
    if width != rows.vectors.shape[1]:
        raise InputError(
            f"{graph}: the text encoder's token vectors are {width} wide, the embeddings' "
            f"{rows.vectors.shape[1]}: the embeddings were trained for another model family"
        )
    if vocabulary != rows.first_id:
        raise InputError(
            f"{graph}: the text encoder's token table has {vocabulary} rows but the tokenizer has "
            f"{rows.first_id} tokens; embeddings need the two to agree"
        )


# --- ONNX, at the protobuf wire level --------------------------------------------------------------------
# Field numbers from onnx.proto (stable since ONNX 1.0).
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_INPUT = 1, 5, 11
_NODE_INPUT, _NODE_OUTPUT, _NODE_NAME, _NODE_OP_TYPE, _NODE_ATTRIBUTE = 1, 2, 3, 4, 5
_TENSOR_DIMS, _TENSOR_DATA_TYPE, _TENSOR_NAME, _TENSOR_RAW_DATA = 1, 2, 8, 9
_VALUE_INFO_NAME = 1
_ATTR_NAME, _ATTR_I, _ATTR_TYPE, _ATTR_TYPE_INT = 1, 3, 20, 2
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
# TensorProto.DataType -> numpy dtype, for the float types a table or a scale can have.
_ONNX_FLOATS = {1: np.dtype("<f4"), 10: np.dtype("<f2"), 11: np.dtype("<f8")}
_ONNX_INTEGERS = {2: "uint8", 3: "int8"}


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64  # protobuf writes negative int64 as ten-byte two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


@dataclass
class _Field:
    number: int
    raw: memoryview  # the whole field, key included, as it sits in the file
    value: int | memoryview  # a varint's value, or a length-delimited payload


def _fields(buf: memoryview) -> Iterator[_Field]:
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _read_varint(buf, pos)
        elif wire == _LEN:
            length, pos = _read_varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
            if pos > len(buf):
                raise ValueError("truncated field")
        elif wire in (_I64, _I32):
            size = 8 if wire == _I64 else 4
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield _Field(number, buf[start:pos], value)


def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _len_field(number: int, payload: bytes) -> bytes:
    return _key(number, _LEN) + _varint(len(payload)) + payload


def _text(value: memoryview) -> str:
    return bytes(value).decode("utf-8")


@dataclass
class _Node:
    raw: memoryview
    op_type: str
    inputs: list[str]
    outputs: list[str]
    other: list[memoryview] = field(default_factory=list)  # every other field, raw

    @classmethod
    def parse(cls, raw: memoryview, payload: memoryview) -> _Node:
        node = cls(raw, "", [], [])
        for f in _fields(payload):
            if f.number == _NODE_INPUT:
                node.inputs.append(_text(f.value))
            elif f.number == _NODE_OUTPUT:
                node.outputs.append(_text(f.value))
            else:
                if f.number == _NODE_OP_TYPE:
                    node.op_type = _text(f.value)
                node.other.append(f.raw)
        return node

    def encode(self) -> bytes:
        """The node with its current inputs and outputs, every other field as it was."""
        body = b"".join(
            [
                *(_len_field(_NODE_INPUT, name.encode()) for name in self.inputs),
                *(_len_field(_NODE_OUTPUT, name.encode()) for name in self.outputs),
                *(bytes(raw) for raw in self.other),
            ]
        )
        return _len_field(_GRAPH_NODE, body)


def _new_node(op_type: str, inputs: list[str], outputs: list[str], axis: int | None = None) -> bytes:
    body = b"".join(_len_field(_NODE_INPUT, name.encode()) for name in inputs)
    body += b"".join(_len_field(_NODE_OUTPUT, name.encode()) for name in outputs)
    body += _len_field(_NODE_NAME, f"sdlite/{outputs[0]}".encode()) + _len_field(_NODE_OP_TYPE, op_type.encode())
    if axis is not None:
        attribute = _len_field(_ATTR_NAME, b"axis") + _key(_ATTR_I, _VARINT) + _varint(axis)
        attribute += _key(_ATTR_TYPE, _VARINT) + _varint(_ATTR_TYPE_INT)
        body += _len_field(_NODE_ATTRIBUTE, attribute)
    return _len_field(_GRAPH_NODE, body)


def _new_initializer(name: str, array: np.ndarray, data_type: int) -> bytes:
    body = b"".join(_key(_TENSOR_DIMS, _VARINT) + _varint(d) for d in array.shape)
    body += _key(_TENSOR_DATA_TYPE, _VARINT) + _varint(data_type)
    body += _len_field(_TENSOR_NAME, name.encode()) + _len_field(_TENSOR_RAW_DATA, array.tobytes())
    return _len_field(_GRAPH_INITIALIZER, body)


def _tensor_header(payload: memoryview) -> tuple[str, tuple[int, ...], int]:
    """Name, dims and data type of an initializer, without touching its data."""
    name, dims, data_type = "", [], 0
    for f in _fields(payload):
        if f.number == _TENSOR_NAME:
            name = _text(f.value)
        elif f.number == _TENSOR_DATA_TYPE:
            data_type = f.value
        elif f.number == _TENSOR_DIMS:
            if isinstance(f.value, int):
                dims.append(f.value)
            else:  # packed
                pos = 0
                while pos < len(f.value):
                    dim, pos = _read_varint(f.value, pos)
                    dims.append(dim)
    return name, tuple(dims), data_type


def extend_onnx_token_table(model: bytes, rows: TokenRows, graph: object = "text encoder") -> bytes:
    """``model`` (a serialized ONNX text encoder) with ``rows`` appended to its token table."""
    try:
        return _extend_onnx(memoryview(model), rows, graph)
    except ValueError as exc:
        raise InputError(f"{graph}: unreadable ONNX file ({exc})") from None


def _extend_onnx(model: memoryview, rows: TokenRows, graph: object) -> bytes:
    top = list(_fields(model))
    graph_fields = [f for f in top if f.number == _MODEL_GRAPH]
    if len(graph_fields) != 1:
        raise ValueError("no graph")
    nodes: list[tuple[int, _Node]] = []
    initializers: dict[str, tuple[tuple[int, ...], int]] = {}
    inputs: set[str] = set()
    parts = list(_fields(graph_fields[0].value))
    for index, f in enumerate(parts):
        if f.number == _GRAPH_NODE:
            nodes.append((index, _Node.parse(f.raw, f.value)))
        elif f.number == _GRAPH_INITIALIZER:
            name, dims, data_type = _tensor_header(f.value)
            initializers[name] = (dims, data_type)
        elif f.number == _GRAPH_INPUT:
            inputs.update(_text(g.value) for g in _fields(f.value) if g.number == _VALUE_INFO_NAME)
    producers = {out: node for _, node in nodes for out in node.outputs}
    consumers: dict[str, list[tuple[int, _Node]]] = {}
    for index, node in nodes:
        for name in node.inputs:
            consumers.setdefault(name, []).append((index, node))

    def from_input_ids(name: str) -> bool:
        while name not in inputs:
            producer = producers.get(name)
            if producer is None or producer.op_type not in _ID_PASSTHROUGH:
                return False
            name = producer.inputs[0]
        return name == INPUT_IDS

    lookups = [
        (index, node)
        for index, node in nodes
        if node.op_type == "Gather"
        and len(node.inputs) == 2
        and len(initializers.get(node.inputs[0], ((),))[0]) == 2
        and from_input_ids(node.inputs[1])
    ]
    if len(lookups) != 1:
        raise InputError(
            f"{graph}: cannot find the token-embedding lookup of {INPUT_IDS} (found {len(lookups)}); "
            "embeddings need a CLIP text encoder exported as optimum or sdlite export it"
        )
    index, gather = lookups[0]
    table = gather.inputs[0]
    dims, data_type = initializers[table]
    _check_table(dims, rows, graph)
    replaced: dict[int, bytes] = {}
    if data_type in _ONNX_FLOATS:
        extra = f"{table}/sdlite_rows"
        new_initializers = [_new_initializer(extra, rows.vectors.astype(_ONNX_FLOATS[data_type]), data_type)]
        extended = f"{table}/sdlite_extended"
        gather.inputs[0] = extended
        replaced[index] = _new_node("Concat", [table, extra], [extended], axis=0) + gather.encode()
    elif data_type in _ONNX_INTEGERS:
        # Gather on the quantized table, then DequantizeLinear(scale, zero point): dequantize first instead.
        users = consumers.get(gather.outputs[0], [])
        dequantize_index, dequantize = users[0] if len(users) == 1 else (None, None)
        if dequantize is None or dequantize.op_type != "DequantizeLinear" or dequantize.inputs[0] != gather.outputs[0]:
            raise InputError(
                f"{graph}: the token table is {_ONNX_INTEGERS[data_type]} but is not dequantized after the lookup"
            )
        quantization = [initializers.get(name) for name in dequantize.inputs[1:] if name]
        scale = quantization[0] if quantization else None
        if None in quantization or scale is None or any(d != 1 for dims, _ in quantization for d in dims):
            raise InputError(f"{graph}: the token table is quantized per channel; embeddings need a per-tensor scale")
        if scale[1] not in _ONNX_FLOATS:
            raise InputError(f"{graph}: the token table's scale has ONNX data type {scale[1]}")
        extra, float_table = f"{table}/sdlite_rows", f"{table}/sdlite_dequantized"
        extended = f"{table}/sdlite_extended"
        new_initializers = [_new_initializer(extra, rows.vectors.astype(_ONNX_FLOATS[scale[1]]), scale[1])]
        gather.inputs[0] = extended
        gather.outputs[0] = dequantize.outputs[0]
        replaced[index] = (
            _new_node("DequantizeLinear", [table, *dequantize.inputs[1:]], [float_table])
            + _new_node("Concat", [float_table, extra], [extended], axis=0)
            + gather.encode()
        )
        replaced[dequantize_index] = b""
    else:
        raise InputError(f"{graph}: the token table has ONNX data type {data_type}, which sdlite cannot extend")
    graph_parts = [replaced.get(i, f.raw) for i, f in enumerate(parts)] + new_initializers
    graph_length = sum(len(part) for part in graph_parts)
    out: list[bytes | memoryview] = []
    for f in top:
        if f.number == _MODEL_GRAPH:
            out += [_key(_MODEL_GRAPH, _LEN), _varint(graph_length), *graph_parts]
        else:
            out.append(f.raw)
    return b"".join(out)


# --- OpenVINO ----------------------------------------------------------------------------------------


def extend_openvino_token_table(model, rows: TokenRows, graph: object = "text encoder") -> None:
    """Append ``rows`` to the token table of ``model`` (an ``openvino.Model``), in place."""
    import openvino.opset13 as ops

    def from_input_ids(output) -> bool:
        node = output.get_node()
        while node.get_type_name() in _ID_PASSTHROUGH:
            node = node.input_value(0).get_node()
        return node.get_type_name() == "Parameter" and INPUT_IDS in node.output(0).get_names()

    lookups = [
        op
        for op in model.get_ordered_ops()
        if op.get_type_name() == "Gather"
        and op.input_value(0).get_partial_shape().is_static
        and len(op.input_value(0).get_shape()) == 2
        and from_input_ids(op.input_value(1))
    ]
    if len(lookups) != 1:
        raise InputError(
            f"{graph}: cannot find the token-embedding lookup of {INPUT_IDS} (found {len(lookups)}); "
            "embeddings need a CLIP text encoder exported as optimum or sdlite export it"
        )
    gather = lookups[0]
    table = gather.input_value(0)
    _check_table(tuple(table.get_shape()), rows, graph)
    if table.get_element_type().is_real():
        extended = ops.concat([table, ops.constant(rows.vectors.astype(table.get_element_type().to_dtype()))], 0)
        gather.input(0).replace_source_output(extended.output(0))
    else:
        # An ONNX int8 table read by OpenVINO: DequantizeLinear became Convert, Subtract, Multiply after the
        # lookup. Apply the same per-tensor steps to the table before it instead.
        chain, output = [], gather.output(0)
        while len(chain) < 3:
            users = list(output.get_target_inputs())
            if len(users) != 1 or users[0].get_node().get_type_name() not in ("Convert", "Subtract", "Multiply"):
                break
            chain.append(users[0])
            output = users[0].get_node().output(0)
        kinds = [user.get_node().get_type_name() for user in chain]
        if kinds not in (["Convert", "Multiply"], ["Convert", "Subtract", "Multiply"]):
            raise InputError(f"{graph}: the token table is an integer table without a dequantization after the lookup")
        value = table
        for user in chain:
            node = user.get_node()
            if node.get_type_name() == "Convert":
                value = ops.convert(value, node.get_destination_type()).output(0)
                continue
            other = node.input_value(1 - user.get_index())
            if any(d != 1 for d in other.get_shape()):
                raise InputError(
                    f"{graph}: the token table is quantized per channel; embeddings need a per-tensor scale"
                )
            operands = (value, other) if user.get_index() == 0 else (other, value)
            value = (ops.subtract if node.get_type_name() == "Subtract" else ops.multiply)(*operands).output(0)
        rows_constant = ops.constant(rows.vectors.astype(value.get_element_type().to_dtype()))
        lookup = ops.gather(ops.concat([value, rows_constant], 0), gather.input_value(1), gather.input_value(2))
        output.replace(lookup.output(0))
    model.validate_nodes_and_infer_types()
