"""int8 weights and activations for the OpenVINO U-Net: NNCF's post-training quantization, one step at a time.

``nncf.quantize`` runs its pipeline in one call: SmoothQuant (which rescales the weights of the transformer
MatMuls and needs a first statistics run), then min/max quantization with fast bias correction (a second run).
Each statistics run compiles the float32 model, which holds a repacked copy of every weight; during the second
run, SmoothQuant's rewritten model also sits in memory (2.4 GB more for the SD 1.5 U-Net). The same pipeline is
run here step by step, and between steps the model is written to a scratch IR and mapped back, so the weights
the next run compiles from are file pages that can be given back (``sdlite.engines.mapped_pages``). The steps,
statistics and result are those of ``nncf.quantize(model, dataset, subset_size=len(samples),
model_type=TRANSFORMER, fast_bias_correction=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def quantize_w8a8(model, samples: Sequence[dict], scratch: Path):
    """``model`` (an fp32 ``ov.Model``) with int8 weights and activations, calibrated on ``samples`` (the
    model's inputs); intermediate models go to the folder ``scratch``, whose mapped pages the caller releases
    while this runs."""
    import nncf
    import openvino as ov
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
        "model_type": nncf.ModelType.TRANSFORMER,
    }
    pipeline = create_ptq_pipeline(**settings)
    dataset = nncf.Dataset(list(samples))
    model = remove_friendly_name_duplicates(model)
    steps = len(pipeline.pipeline_steps)
    scratch.mkdir(parents=True, exist_ok=True)
    for index in range(steps):
        graph = build_graph(model)
        points = pipeline.get_statistic_points_for_step(index, model, graph)
        statistics = collect_statistics(points, model, graph, dataset)
        model = pipeline.run_step(index, statistics, model, graph)
        del graph, points, statistics
        if index < steps - 1:
            path = scratch / f"step{index}.xml"
            ov.save_model(model, str(path), compress_to_fp16=False)
            del model
            model = ov.Core().read_model(str(path))
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
