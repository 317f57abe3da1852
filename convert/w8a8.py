"""int8 weights and activations for OpenVINO graphs (the U-Net, the tiny VAE's decoder): NNCF's post-training
quantization, one step at a time.

``nncf.quantize`` runs its pipeline in one call: SmoothQuant (which rescales the weights of the transformer
MatMuls and needs a first statistics run), then min/max quantization with fast bias correction (a second run).
Each statistics run compiles the float32 model, which holds a repacked copy of every weight; during the second
run, SmoothQuant's rewritten model also sits in memory (2.4 GB more for the SD 1.5 U-Net). The same pipeline is
run here step by step. SmoothQuant computes every rewritten weight, in float64, before it applies any (17.9 GB
for SDXL's U-Net): each is written to a scratch file in the weight's own type as it is computed, and the model
takes a mapping of that file. Between steps, the constants held in process memory or in writable mappings are
written to a scratch IR and mapped back read-only, so the weights the next run compiles from are all file pages
that can be given back (``sdlite.engines.mapped_pages``). Only those are written: saving the whole model would read
every unchanged weight through its mapping in one call that holds the GIL, so the pages could not be given back
as it runs (1.4 GB more at that moment in the converter). The steps, statistics and result are those of
``nncf.quantize(model, dataset, subset_size=len(samples), model_type=..., fast_bias_correction=True)``, the model
type a transformer for graphs with MatMuls (``_model_type``).

Statistics are collected by ``sdlite.convert.w8a8_statistics``: for a model too large to compile at once, one piece
of the graph at a time.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from sdlite.convert.phases import release_freed_memory
from sdlite.convert.w8a8_statistics import PIECE_BYTES, collect
from sdlite.engines.mapped_pages import mapped_files


def quantize_w8a8(model, samples: Sequence[dict], scratch: Path, piece_bytes: float = PIECE_BYTES):
    """``model`` (an fp32 ``ov.Model``) with int8 weights and activations, calibrated on ``samples`` (the
    model's inputs); intermediate models go to the folder ``scratch``, whose mapped pages the caller releases
    while this runs. A model of more than ``piece_bytes`` of weights collects its statistics piece by piece."""
    import nncf
    from nncf.common.factory import build_graph
    from nncf.openvino.graph.model_utils import remove_friendly_name_duplicates
    from nncf.openvino.rt_info import dump_parameters
    from nncf.quantization.advanced_parameters import convert_to_dict_recursively
    from nncf.quantization.algorithms.post_training.pipeline import create_ptq_pipeline
    from openvino._offline_transformations import compress_quantize_weights_transformation

    settings = {
        "subset_size": len(samples),
        "fast_bias_correction": True,
        "model_type": _model_type(model),
    }
    pipeline = create_ptq_pipeline(**settings)
    model = remove_friendly_name_duplicates(model)
    steps = len(pipeline.pipeline_steps)
    scratch.mkdir(parents=True, exist_ok=True)
    for index in range(steps):
        graph = build_graph(model)
        points = pipeline.get_statistic_points_for_step(index, model, graph)
        statistics = collect(points, model, graph, samples, piece_bytes)
        with _rewritten_weights_on_disk(model, scratch / f"step{index}-weights"):
            model = pipeline.run_step(index, statistics, model, graph)
        del graph, points, statistics
        if index < steps - 1:
            _map_rewritten_weights(model, scratch / f"step{index}.xml")
            release_freed_memory()  # the rewritten weights' heap copies, gone from the graph
            shutil.rmtree(scratch / f"step{index}-weights", ignore_errors=True)
    compress_quantize_weights_transformation(model)
    dump_parameters(
        model,
        {
            "preset": None,
            "target_device": nncf.TargetDevice.ANY.value,
            **settings,
            "ignored_scope": None,
            "advanced_parameters": convert_to_dict_recursively(None),
        },
    )
    return model


def _model_type(model):
    """NNCF's model type for ``model``: a transformer when it has MatMuls (SmoothQuant for their activations,
    asymmetric activation ranges), else its convolutional default (such as the tiny VAE's decoder: ReLU outputs
    quantized symmetrically as unsigned, no zero points: 1.2x faster kernels there than the transformer settings)."""
    import nncf

    has_matmul = any(op.get_type_name() == "MatMul" for op in model.get_ops())
    return nncf.ModelType.TRANSFORMER if has_matmul else None


@contextlib.contextmanager
def _rewritten_weights_on_disk(model, folder: Path) -> Iterator[None]:
    """While NNCF's SmoothQuant registers rewritten weights of ``model``, each goes to a ``.npy`` file in
    ``folder``, in the weight's own type (SmoothQuant computes them in float64), and the weight update it
    registers holds a copy-on-write mapping of that file instead of the array."""
    import openvino as ov
    from nncf.openvino.graph.model_transformer import OVModelTransformer
    from nncf.quantization.algorithms.smooth_quant.openvino_backend import OVSmoothQuantAlgoBackend as backend

    update = backend.weight_update_command
    numbers = itertools.count()
    nodes = {op.get_friendly_name(): op for op in model.get_ops()}

    def update_from_disk(node_with_weight, nncf_graph, weight_value):
        port = backend.get_weight_tensor_port_id(node_with_weight)
        kind = nodes[node_with_weight.node_name].input(port).get_element_type()
        if not kind.is_real() or kind == ov.Type.bf16:  # numpy has no bfloat16
            return update(node_with_weight, nncf_graph, weight_value)
        # the conversion NNCF's model transformer would apply to the value when it sets the weight
        value = OVModelTransformer._convert_to_dtype(weight_value, kind.to_dtype())
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{next(numbers)}.npy"
        np.save(path, value)
        del value
        return update(node_with_weight, nncf_graph, np.load(path, mmap_mode="c"))

    backend.weight_update_command = staticmethod(update_from_disk)
    try:
        yield
    finally:
        backend.weight_update_command = staticmethod(update)


def _map_rewritten_weights(model, path: Path) -> None:
    """Move ``model``'s weights held in process memory or in writable file mappings (whose pages cannot be given
    back) to the IR ``path`` and put its read-only mapped copies in their place: same values, same names."""
    import openvino as ov
    import openvino.opset13 as ops

    mapped = [(start, start + length) for start, length, access, _ in mapped_files() if access.startswith("r-")]

    def movable(constant) -> bool:
        data = constant.get_data()
        if not data.nbytes:
            return False
        address = data.ctypes.data
        return not any(start <= address < end for start, end in mapped)

    constants = [op for op in model.get_ordered_ops() if op.get_type_name() == "Constant" and movable(op)]
    if not constants:
        return
    ov.save_model(ov.Model([ops.result(c.output(0)) for c in constants], [], "weights"), str(path), False)
    for old, result in zip(constants, ov.Core().read_model(str(path)).get_results(), strict=True):
        new = result.input_value(0).get_node()
        new.set_friendly_name(old.get_friendly_name())
        new.output(0).get_tensor().set_names(old.output(0).get_tensor().get_names())
        old.output(0).replace(new.output(0))
