"""ONNX graphs read and edited at the protobuf wire level, without the ``onnx`` package.

onnxruntime has no graph-editing API, and the runtime does not depend on ``onnx``; the edits sdlite makes to a
loaded graph (new token-table rows, LoRA branches) need only a graph's nodes, inputs and initializer headers,
and to write back the same bytes with a few nodes rewired and a few added. :class:`WireGraph` reads those and
leaves every other byte as it was (initializer data is never decoded, so a graph with gigabytes of weights is
edited in the time it takes to copy it).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

# Field numbers from onnx.proto (stable since ONNX 1.0).
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_INPUT = 1, 5, 11
_NODE_INPUT, _NODE_OUTPUT, _NODE_NAME, _NODE_OP_TYPE, _NODE_ATTRIBUTE = 1, 2, 3, 4, 5
_TENSOR_DIMS, _TENSOR_DATA_TYPE, _TENSOR_NAME, _TENSOR_RAW_DATA = 1, 2, 8, 9
_VALUE_INFO_NAME, _VALUE_INFO_TYPE = 1, 2
_TYPE_TENSOR, _TENSOR_TYPE_ELEM, _TENSOR_TYPE_SHAPE, _SHAPE_DIM, _DIM_VALUE = 1, 1, 2, 1, 1
_ATTR_NAME, _ATTR_I, _ATTR_INTS, _ATTR_TYPE = 1, 3, 8, 20
_ATTR_TYPE_INT, _ATTR_TYPE_INTS = 2, 7
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
# TensorProto.DataType numbers.
FLOAT, UINT8, INT8, FLOAT16, DOUBLE, INT64 = 1, 2, 3, 10, 11, 7
# TensorProto.DataType -> numpy dtype, for the float types a weight, a table or a scale can have.
ONNX_FLOATS = {FLOAT: np.dtype("<f4"), FLOAT16: np.dtype("<f2"), DOUBLE: np.dtype("<f8")}
ONNX_INTEGERS = {UINT8: "uint8", INT8: "int8"}
_NUMPY_TYPES = {np.dtype("<f4"): FLOAT, np.dtype("<f2"): FLOAT16, np.dtype("<i8"): INT64}


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


def _ints(value: int | memoryview) -> list[int]:
    """A repeated int64 field's values (one unpacked value, or a packed run)."""
    if isinstance(value, int):
        return [value]
    out, pos = [], 0
    while pos < len(value):
        number, pos = _read_varint(value, pos)
        out.append(number)
    return out


@dataclass
class Node:
    """One graph node: its op type, name, inputs and outputs; every other field is kept as raw bytes."""

    op_type: str
    name: str
    inputs: list[str]
    outputs: list[str]
    other: list[memoryview] = field(default_factory=list)

    @classmethod
    def parse(cls, payload: memoryview) -> Node:
        """The node in a NodeProto's bytes."""
        node = cls("", "", [], [])
        for f in _fields(payload):
            if f.number == _NODE_INPUT:
                node.inputs.append(_text(f.value))
            elif f.number == _NODE_OUTPUT:
                node.outputs.append(_text(f.value))
            else:
                if f.number == _NODE_OP_TYPE:
                    node.op_type = _text(f.value)
                elif f.number == _NODE_NAME:
                    node.name = _text(f.value)
                node.other.append(f.raw)
        return node

    def attributes(self) -> list[memoryview]:
        """The node's attributes, as raw AttributeProto fields (copied unchanged into a new node)."""
        return [raw for raw in self.other if next(_fields(raw)).number == _NODE_ATTRIBUTE]

    def int_attribute(self, name: str, default: int) -> int:
        """The value of the integer attribute ``name`` (``default`` when the node has none)."""
        for raw in self.attributes():
            attribute = {f.number: f.value for f in _fields(next(_fields(raw)).value)}
            if _text(attribute.get(_ATTR_NAME, memoryview(b""))) == name and _ATTR_I in attribute:
                return int(attribute[_ATTR_I])
        return default

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


def int_attribute(name: str, value: int) -> bytes:
    """An AttributeProto field holding one integer."""
    body = _len_field(_ATTR_NAME, name.encode()) + _key(_ATTR_I, _VARINT) + _varint(value)
    return _len_field(_NODE_ATTRIBUTE, body + _key(_ATTR_TYPE, _VARINT) + _varint(_ATTR_TYPE_INT))


def new_node(op_type: str, inputs: list[str], outputs: list[str], attributes: list[bytes] = ()) -> bytes:
    """A NodeProto field named after its first output; ``attributes`` are AttributeProto fields (raw)."""
    body = b"".join(_len_field(_NODE_INPUT, name.encode()) for name in inputs)
    body += b"".join(_len_field(_NODE_OUTPUT, name.encode()) for name in outputs)
    body += _len_field(_NODE_NAME, f"sdlite/{outputs[0]}".encode()) + _len_field(_NODE_OP_TYPE, op_type.encode())
    return _len_field(_GRAPH_NODE, body + b"".join(bytes(a) for a in attributes))


def new_initializer(name: str, array: np.ndarray, data_type: int | None = None) -> bytes:
    """A TensorProto field holding ``array`` (little-endian raw data) as ONNX type ``data_type`` (by default
    the array's own: float32, float16 or int64)."""
    array = np.ascontiguousarray(array, array.dtype.newbyteorder("<"))
    data_type = data_type if data_type is not None else _NUMPY_TYPES[array.dtype]
    body = b"".join(_key(_TENSOR_DIMS, _VARINT) + _varint(d) for d in array.shape)
    body += _key(_TENSOR_DATA_TYPE, _VARINT) + _varint(data_type)
    body += _len_field(_TENSOR_NAME, name.encode()) + _len_field(_TENSOR_RAW_DATA, array.tobytes())
    return _len_field(_GRAPH_INITIALIZER, body)


def new_input(name: str, data_type: int, shape: tuple[int, ...]) -> bytes:
    """A graph-input ValueInfoProto field: a tensor of ``data_type`` with a fixed ``shape``."""
    dims = b"".join(_len_field(_SHAPE_DIM, _key(_DIM_VALUE, _VARINT) + _varint(d)) for d in shape)
    tensor_type = _key(_TENSOR_TYPE_ELEM, _VARINT) + _varint(data_type) + _len_field(_TENSOR_TYPE_SHAPE, dims)
    body = _len_field(_VALUE_INFO_NAME, name.encode()) + _len_field(
        _VALUE_INFO_TYPE, _len_field(_TYPE_TENSOR, tensor_type)
    )
    return _len_field(_GRAPH_INPUT, body)


def _tensor_header(payload: memoryview) -> tuple[str, tuple[int, ...], int]:
    """Name, dims and data type of an initializer, without touching its data."""
    name, dims, data_type = "", [], 0
    for f in _fields(payload):
        if f.number == _TENSOR_NAME:
            name = _text(f.value)
        elif f.number == _TENSOR_DATA_TYPE:
            data_type = f.value
        elif f.number == _TENSOR_DIMS:
            dims.extend(_ints(f.value))
    return name, tuple(dims), data_type


class WireGraph:
    """A serialized ONNX model's graph: its nodes (in file order), inputs and initializer headers, editable by
    replacing nodes and appending new fields; :meth:`serialize` writes the model back."""

    def __init__(self, model: bytes):
        self._model = memoryview(model)
        self._top = list(_fields(self._model))
        graphs = [f for f in self._top if f.number == _MODEL_GRAPH]
        if len(graphs) != 1:
            raise ValueError("no graph")
        self._parts = list(_fields(graphs[0].value))
        self.nodes: list[tuple[int, Node]] = []
        # Initializer name -> (dims, ONNX data type).
        self.initializers: dict[str, tuple[tuple[int, ...], int]] = {}
        self.inputs: set[str] = set()
        for index, f in enumerate(self._parts):
            if f.number == _GRAPH_NODE:
                self.nodes.append((index, Node.parse(f.value)))
            elif f.number == _GRAPH_INITIALIZER:
                name, dims, data_type = _tensor_header(f.value)
                self.initializers[name] = (dims, data_type)
            elif f.number == _GRAPH_INPUT:
                self.inputs.update(_text(g.value) for g in _fields(f.value) if g.number == _VALUE_INFO_NAME)
        self._replaced: dict[int, bytes] = {}
        self._appended: list[bytes] = []

    def producers(self) -> dict[str, Node]:
        """Tensor name -> the node that produces it."""
        return {out: node for _, node in self.nodes for out in node.outputs}

    def consumers(self) -> dict[str, list[tuple[int, Node]]]:
        """Tensor name -> the (index, node) pairs that read it."""
        users: dict[str, list[tuple[int, Node]]] = {}
        for index, node in self.nodes:
            for name in node.inputs:
                users.setdefault(name, []).append((index, node))
        return users

    def replace(self, index: int, fields: bytes) -> None:
        """Write ``fields`` (encoded nodes, or nothing) where the node at ``index`` was."""
        self._replaced[index] = fields

    def append(self, fields: bytes) -> None:
        """Add encoded initializers or inputs at the end of the graph (new nodes go through :meth:`replace`, next
        to the node whose output they read, which keeps the node list in topological order as ONNX requires)."""
        self._appended.append(fields)

    def serialize(self) -> bytes:
        """The model with the edits made."""
        parts = [self._replaced.get(i, f.raw) for i, f in enumerate(self._parts)] + self._appended
        length = sum(len(part) for part in parts)
        out: list[bytes | memoryview] = []
        for f in self._top:
            if f.number == _MODEL_GRAPH:
                out += [_key(_MODEL_GRAPH, _LEN), _varint(length), *parts]
            else:
                out.append(f.raw)
        return b"".join(out)
