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

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdlite.errors import InputError
from sdlite.onnx_wire import ONNX_FLOATS, ONNX_INTEGERS, WireGraph, int_attribute, new_initializer, new_node

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


# --- ONNX, at the protobuf wire level (sdlite.onnx_wire) -------------------------------------------------


def extend_onnx_token_table(model: bytes, rows: TokenRows, graph: object = "text encoder") -> bytes:
    """``model`` (a serialized ONNX text encoder) with ``rows`` appended to its token table."""
    try:
        return _extend_onnx(memoryview(model), rows, graph)
    except ValueError as exc:
        raise InputError(f"{graph}: unreadable ONNX file ({exc})") from None


def _extend_onnx(model: memoryview, rows: TokenRows, graph: object) -> bytes:
    wire = WireGraph(model)
    producers = wire.producers()
    consumers = wire.consumers()
    initializers = wire.initializers

    def from_input_ids(name: str) -> bool:
        while name not in wire.inputs:
            producer = producers.get(name)
            if producer is None or producer.op_type not in _ID_PASSTHROUGH:
                return False
            name = producer.inputs[0]
        return name == INPUT_IDS

    lookups = [
        (index, node)
        for index, node in wire.nodes
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
    if data_type in ONNX_FLOATS:
        extra = f"{table}/sdlite_rows"
        wire.append(new_initializer(extra, rows.vectors.astype(ONNX_FLOATS[data_type]), data_type))
        extended = f"{table}/sdlite_extended"
        gather.inputs[0] = extended
        concat = new_node("Concat", [table, extra], [extended], [int_attribute("axis", 0)])
        wire.replace(index, concat + gather.encode())
    elif data_type in ONNX_INTEGERS:
        # Gather on the quantized table, then DequantizeLinear(scale, zero point): dequantize first instead.
        users = consumers.get(gather.outputs[0], [])
        dequantize_index, dequantize = users[0] if len(users) == 1 else (None, None)
        if dequantize is None or dequantize.op_type != "DequantizeLinear" or dequantize.inputs[0] != gather.outputs[0]:
            raise InputError(
                f"{graph}: the token table is {ONNX_INTEGERS[data_type]} but is not dequantized after the lookup"
            )
        quantization = [initializers.get(name) for name in dequantize.inputs[1:] if name]
        scale = quantization[0] if quantization else None
        if None in quantization or scale is None or any(d != 1 for dims, _ in quantization for d in dims):
            raise InputError(f"{graph}: the token table is quantized per channel; embeddings need a per-tensor scale")
        if scale[1] not in ONNX_FLOATS:
            raise InputError(f"{graph}: the token table's scale has ONNX data type {scale[1]}")
        extra, float_table = f"{table}/sdlite_rows", f"{table}/sdlite_dequantized"
        extended = f"{table}/sdlite_extended"
        wire.append(new_initializer(extra, rows.vectors.astype(ONNX_FLOATS[scale[1]]), scale[1]))
        gather.inputs[0] = extended
        gather.outputs[0] = dequantize.outputs[0]
        wire.replace(
            index,
            new_node("DequantizeLinear", [table, *dequantize.inputs[1:]], [float_table])
            + new_node("Concat", [float_table, extra], [extended], [int_attribute("axis", 0)])
            + gather.encode(),
        )
        wire.replace(dequantize_index, b"")
    else:
        raise InputError(f"{graph}: the token table has ONNX data type {data_type}, which sdlite cannot extend")
    return wire.serialize()


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
