"""int8 weights and activations for OpenVINO graphs (the U-Net, the tiny VAE's decoder): NNCF's post-training
quantization, one step at a time.

``nncf.quantize`` runs its pipeline in one call: SmoothQuant (which rescales the weights of the transformer
MatMuls and needs a first statistics run), then min/max quantization with fast bias correction (a second run).
Each statistics run compiles the float32 model, which holds a repacked copy of every weight; during the second
run, SmoothQuant's rewritten model also sits in memory (2.4 GB more for the SD 1.5 U-Net). The same pipeline is
run here step by step, and between steps the weights SmoothQuant rewrote are written to a scratch IR and mapped
back, so the weights the next run compiles from are all file pages that can be given back
(``sdlite.engines.mapped_pages``). Only those weights are written: saving the whole model would read every
unchanged weight through its mapping in one call that holds the GIL, so the pages could not be given back as it
runs (1.4 GB more at that moment in the converter). The steps, statistics and result are those of
``nncf.quantize(model, dataset, subset_size=len(samples), model_type=..., fast_bias_correction=True)``, the model
type a transformer for graphs with MatMuls (``_model_type``).

NNCF collects its statistics with reductions added to the graph as extra outputs, after the model's own. The
OpenVINO CPU plugin orders nodes by walking back from the outputs in their order, so every reduction would run
after the whole U-Net and each tensor it reads would stay allocated until then (about 2 GB for the SD 1.5 U-Net at
64x64 latents). Listing the added outputs first puts each reduction right after the tensor it reads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

from sdlite.convert.phases import release_freed_memory
from sdlite.engines.mapped_pages import mapped_files


def quantize_w8a8(model, samples: Sequence[dict], scratch: Path):
    """``model`` (an fp32 ``ov.Model``) with int8 weights and activations, calibrated on ``samples`` (the
    model's inputs); intermediate models go to the folder ``scratch``, whose mapped pages the caller releases
    while this runs."""
    import nncf
    from nncf.common.factory import build_graph
    from nncf.openvino.graph.model_utils import remove_friendly_name_duplicates
    from nncf.openvino.rt_info import dump_parameters
    from nncf.quantization.advanced_parameters import convert_to_dict_recursively
    from nncf.quantization.algorithms.pipeline import collect_statistics
    from nncf.quantization.algorithms.post_training.pipeline import create_ptq_pipeline
    from openvino._offline_transformations import compress_quantize_weights_transformation

    settings = {
        "subset_size": len(samples),
        "fast_bias_correction": True,
        "model_type": _model_type(model),
    }
    pipeline = create_ptq_pipeline(**settings)
    dataset = nncf.Dataset(list(samples))
    model = remove_friendly_name_duplicates(model)
    steps = len(pipeline.pipeline_steps)
    scratch.mkdir(parents=True, exist_ok=True)
    for index in range(steps):
        graph = build_graph(model)
        points = pipeline.get_statistic_points_for_step(index, model, graph)
        with _reductions_first(len(model.get_results())):
            statistics = collect_statistics(points, model, graph, dataset)
        model = pipeline.run_step(index, statistics, model, graph)
        del graph, points, statistics
        if index < steps - 1:
            _map_rewritten_weights(model, scratch / f"step{index}.xml")
            release_freed_memory()  # the rewritten weights' heap copies, gone from the graph
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


def _map_rewritten_weights(model, path: Path) -> None:
    """Move ``model``'s weights held in process memory (rather than mapped from a file) to the IR ``path`` and
    put the mapped copies in their place: same values, same names."""
    import openvino as ov
    import openvino.opset13 as ops

    mapped = [(start, start + length) for start, length, _, _ in mapped_files()]

    def in_memory(constant) -> bool:
        data = constant.get_data()
        if not data.nbytes:
            return False
        address = data.ctypes.data
        return not any(start <= address < end for start, end in mapped)

    constants = [op for op in model.get_ordered_ops() if op.get_type_name() == "Constant" and in_memory(op)]
    if not constants:
        return
    ov.save_model(ov.Model([ops.result(c.output(0)) for c in constants], [], "weights"), str(path), False)
    for old, result in zip(constants, ov.Core().read_model(str(path)).get_results(), strict=True):
        new = result.input_value(0).get_node()
        new.set_friendly_name(old.get_friendly_name())
        new.output(0).get_tensor().set_names(old.output(0).get_tensor().get_names())
        old.output(0).replace(new.output(0))


@contextlib.contextmanager
def _reductions_first(own_outputs: int) -> Iterator[None]:
    """While NNCF collects statistics, its engines get the model with the outputs it added listed before the
    model's ``own_outputs`` (same nodes, same tensor names: NNCF reads outputs by name)."""
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
        return create(model)

    factory.EngineFactory.create = staticmethod(create_reordered)
    try:
        yield
    finally:
        factory.EngineFactory.create = staticmethod(create)
