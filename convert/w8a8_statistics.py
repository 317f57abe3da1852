"""NNCF's calibration statistics for an OpenVINO model, for the whole graph at once or one piece of it at a time.

NNCF collects statistics by compiling the float32 model with reductions added as extra outputs, and OpenVINO's
CPU plugin holds a repacked copy of every weight while it runs: 10.3 GB for SDXL's U-Net, more than a 16 GB
machine has beside everything else. A model whose weights exceed ``piece_bytes`` is therefore cut: its
operations, in topological order, are split into consecutive pieces of about ``piece_bytes`` of weights; each
piece becomes a model of its own whose inputs are the tensors it reads from earlier pieces (or the model's
inputs) and whose outputs are the tensors later pieces read. The pieces run in order over every sample, each
sample's crossing tensors carried from one to the next, and each piece collects the statistics of the operations
inside it: the statistics of the whole model (up to the last bits of float32 kernels fused across a cut), with
one piece's weights compiled at a time.

NNCF adds its reductions after the model's own outputs. The CPU plugin orders nodes by walking back from the
outputs in their order, so every reduction would run after the whole graph and each tensor it reads would stay
allocated until then (about 2 GB for the SD 1.5 U-Net at 64x64 latents). Listing the added outputs first puts
each reduction right after the tensor it reads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from sdlite.convert.phases import release_freed_memory

# Float weights a statistics run compiles at once: SD 1.5's U-Net (3.4 GB) runs whole, SDXL's (10.3 GB) in 3 pieces.
PIECE_BYTES = 3.6e9
_NOT_CUT = ("Constant", "Parameter", "Result")


@dataclass
class Piece:
    """Consecutive operations of a model (by name) and the tensors (``tensor_key``) it reads from outside
    itself and writes for later pieces or the model's results."""

    names: set[str] = field(default_factory=set)
    reads: list[str] = field(default_factory=list)
    writes: list[str] = field(default_factory=list)


def collect(points, model, graph, samples: Sequence[dict], piece_bytes: float = PIECE_BYTES):
    """Fill NNCF's statistic ``points`` of ``model`` (``graph``: its NNCF graph) from ``samples`` (the
    model's inputs by name), whole or piece by piece (module docstring); return ``points``."""
    import nncf
    from nncf.quantization.algorithms.pipeline import collect_statistics

    if weight_bytes(model) <= piece_bytes:
        with _reductions_first(len(model.get_results())):
            return collect_statistics(points, model, graph, nncf.Dataset(list(samples)))
    _collect_by_pieces(points, model, samples, cut_into_pieces(model, piece_bytes))
    return points


def weight_bytes(model) -> int:
    """Bytes of ``model``'s float constants (its weights)."""
    return sum(op.get_byte_size() for op in model.get_ops() if _is_weight(op))


def tensor_key(output) -> str:
    """A name for an ``ov.Output``'s tensor that no other tensor of the model has: producer name and port."""
    return f"{output.get_node().get_friendly_name()}:{output.get_index()}"


def _is_weight(op) -> bool:
    return op.get_type_name() == "Constant" and op.get_element_type().is_real()


def cut_into_pieces(model, piece_bytes: float) -> list[Piece]:
    """``model``'s operations in topological order cut into consecutive pieces of about ``piece_bytes`` of
    weights each (names must be unique); each cut sits, within the last tenth of its piece, where the fewest
    tensors cross it."""
    ordered = [op for op in model.get_ordered_ops() if op.get_type_name() not in _NOT_CUT]
    position = {op.get_friendly_name(): index for index, op in enumerate(ordered)}
    weights = np.zeros(len(ordered))
    # crossing[c]: reads at or after operation c of tensors written before it (the model's inputs: from the start)
    crossing = np.zeros(len(ordered) + 1, dtype=np.int64)
    for index, op in enumerate(ordered):
        for source in op.inputs():
            producer = source.get_source_output().get_node()
            if _is_weight(producer):
                weights[index] += producer.get_byte_size()
            elif producer.get_type_name() != "Constant":
                crossing[position.get(producer.get_friendly_name(), -1) + 1] += 1
                crossing[index + 1] -= 1
    crossing = np.cumsum(crossing)
    cumulative = np.cumsum(weights)
    count = max(1, int(np.ceil(cumulative[-1] / piece_bytes)))
    cuts = [0]
    for number in range(1, count):
        target = max(cuts[-1] + 1, int(np.searchsorted(cumulative, cumulative[-1] * number / count)))
        window = np.arange(max(cuts[-1] + 1, target - (target - cuts[-1]) // 10), target + 1)
        cuts.append(int(window[np.argmin(crossing[window])]))
    cuts.append(len(ordered))

    piece_of = {}
    pieces = []
    for start, end in zip(cuts, cuts[1:], strict=False):
        pieces.append(Piece(names={op.get_friendly_name() for op in ordered[start:end]}))
        piece_of.update(dict.fromkeys(pieces[-1].names, len(pieces) - 1))
    for op in model.get_ordered_ops():
        kind = op.get_type_name()
        if kind in ("Constant", "Parameter"):
            continue
        reader = piece_of.get(op.get_friendly_name())
        for source in op.inputs():
            output = source.get_source_output()
            if output.get_node().get_type_name() == "Constant":
                continue
            key = tensor_key(output)
            writer = piece_of.get(output.get_node().get_friendly_name())
            if writer is not None and writer != reader and key not in pieces[writer].writes:
                pieces[writer].writes.append(key)
            if reader is not None and writer != reader and key not in pieces[reader].reads:
                pieces[reader].reads.append(key)
    return pieces


def piece_model(model, piece: Piece):
    """``piece`` of ``model`` as a model of its own, cut from a clone (the weights are shared, not copied). Inputs
    and outputs are the tensors ``piece.reads`` and ``piece.writes``, named by their keys; an input takes the
    name of the node that writes the tensor, so that statistics on that node's output can be placed on it."""
    import openvino as ov
    import openvino.opset13 as ops

    clone = model.clone()
    outputs = {tensor_key(output): output for op in clone.get_ops() for output in op.outputs()}
    parameters = []
    for key in piece.reads:
        source = outputs[key]
        parameter = ops.parameter(source.get_partial_shape(), source.get_element_type())
        writer = source.get_node()
        parameter.set_friendly_name(writer.get_friendly_name() if len(writer.outputs()) == 1 else key)
        parameter.output(0).get_tensor().set_names({key})
        for target in list(source.get_target_inputs()):
            if target.get_node().get_friendly_name() in piece.names:
                target.replace_source_output(parameter.output(0))
        parameters.append(parameter)
    results = []
    for key in piece.writes:
        outputs[key].get_tensor().add_names({key})
        results.append(ops.result(outputs[key]))
    return ov.Model(results, parameters, "piece")


def _points_by_piece(points, pieces: Sequence[Piece], input_names: set[str]) -> list:
    """NNCF's statistic ``points`` split by the piece that holds their target operation (points on a model input:
    the first piece that reads it)."""
    from nncf.common.tensor_statistics.statistic_point import StatisticPointsContainer

    owner = {name: number for number, piece in enumerate(pieces) for name in piece.names}
    for number in reversed(range(len(pieces))):
        for key in pieces[number].reads:
            writer = key.rsplit(":", 1)[0]
            if writer in input_names:
                owner[writer] = number
    split = [StatisticPointsContainer() for _ in pieces]
    for name, statistic_points in points.data.items():
        if name not in owner:
            raise RuntimeError(f"no piece of the model holds statistic target {name!r}")
        for point in statistic_points:
            split[owner[name]].add_statistic_point(point)
    return split


def _collect_by_pieces(points, model, samples: Sequence[dict], pieces: Sequence[Piece]) -> None:
    """Run ``pieces`` in order over ``samples``, filling ``points`` (module docstring)."""
    import nncf
    from nncf.common.factory import build_graph
    from nncf.quantization.algorithms.pipeline import collect_statistics

    parameters = model.get_parameters()
    inputs = {name: tensor_key(p.output(0)) for p in parameters for name in p.output(0).get_names()}
    carried = [{inputs[name]: value for name, value in sample.items()} for sample in samples]
    split = _points_by_piece(points, pieces, {parameter.get_friendly_name() for parameter in parameters})
    for number, (piece, container) in enumerate(zip(pieces, split, strict=True)):
        sub = piece_model(model, piece)
        dataset = [{key: values[key] for key in piece.reads} for values in carried]
        written: list[dict] = []
        if container:
            with _reductions_first(len(sub.get_results()), piece.writes, written):
                collect_statistics(container, sub, build_graph(sub), nncf.Dataset(dataset))
        else:
            written = _run(sub, dataset, piece.writes)
        del sub
        release_freed_memory()  # the compiled piece
        later = {key for following in pieces[number + 1 :] for key in following.reads}
        carried = [
            {key: value for key, value in {**values, **new}.items() if key in later}
            for values, new in zip(carried, written, strict=True)
        ]


def _run(model, dataset: Sequence[dict], keys: Sequence[str]) -> list[dict]:
    """``model``'s outputs ``keys`` for each input of ``dataset``, computed in float32."""
    import openvino as ov
    from openvino.properties.hint import inference_precision

    from sdlite.engines.openvino import core

    request = core().compile_model(model, "CPU", {inference_precision: ov.Type.f32}).create_infer_request()
    written = []
    for inputs in dataset:
        outputs = request.infer(inputs)
        written.append({key: outputs[key].copy() for key in keys})
    return written


@contextlib.contextmanager
def _reductions_first(own_outputs: int, keep: Sequence[str] = (), kept: list | None = None) -> Iterator[None]:
    """While NNCF collects statistics, its engines get the model with the outputs it added listed before the
    model's ``own_outputs`` (same nodes, same tensor names: NNCF reads outputs by name); each inference's
    outputs named ``keep`` are appended to ``kept``."""
    import openvino as ov
    from nncf.common import factory

    create = factory.EngineFactory.create

    def create_reordered(model):
        results = list(model.get_results())
        if len(results) > own_outputs:
            model = ov.Model(
                results=results[own_outputs:] + results[:own_outputs],
                sinks=list(model.get_sinks()),
                parameters=list(model.get_parameters()),
                name=model.friendly_name,
            )
        engine = create(model)
        return _Keeping(engine, keep, kept) if keep else engine

    factory.EngineFactory.create = staticmethod(create_reordered)
    try:
        yield
    finally:
        factory.EngineFactory.create = staticmethod(create)


class _Keeping:
    """An NNCF engine that appends the outputs named ``keep`` of each inference to ``kept`` (a wrapper, not an
    attribute patched onto the engine: that would be a reference cycle keeping the compiled piece alive)."""

    def __init__(self, engine, keep: Sequence[str], kept: list):
        self.engine, self.keep, self.kept = engine, keep, kept

    def infer(self, inputs):
        outputs = self.engine.infer(inputs)
        self.kept.append({key: outputs[key] for key in self.keep})
        return outputs
