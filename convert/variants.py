"""Derive the requested formats and precisions of one part from its fp32 ONNX export.

Every variant starts from the same validated fp32 ONNX graph:
- ONNX fp16: onnxruntime's float16 converter, inputs and outputs kept fp32 (for GPU execution providers).
- ONNX int8: onnxruntime's dynamic quantization (int8 weights, activations quantized at run time).
- OpenVINO IR fp32 / fp16: ``ov.convert_model`` on the ONNX file (seconds, against minutes from
  torch: 4 s against 80 s for the SD 1.5 U-Net), saved with or without fp16 weight compression.
- OpenVINO IR int8: NNCF weight compression (INT8_ASYM) of every MatMul/Conv weight.
- OpenVINO IR w8a8 (U-Net only): NNCF post-training quantization of weights *and* activations, calibrated
  on U-Net inputs recorded while generating real prompts (optimum-intel's "hybrid" mode does the same);
  the VNNI int8 kernels then hold weights at one byte each and run about 1.5x faster than bf16.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from sdlite.convert.onnx_export import save_onnx
from sdlite.layout import GRAPH_FILES, ONNX_EXTERNAL_DATA, graph_files

FORMATS = ("onnx", "openvino")
PRECISIONS = ("fp32", "fp16", "int8", "w8a8")


def onnx_fp16(base: Path, out_dir: Path) -> list[Path]:
    """fp16 weights and arithmetic, fp32 inputs/outputs."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    out_dir.mkdir(parents=True, exist_ok=True)
    # Shape inference from the file works above protobuf's 2 GB limit; the converter's own does not. The
    # inferred copy sits next to the source so that its relative external-data path still resolves.
    inferred = base.with_name(".inferred.onnx")
    try:
        onnx.shape_inference.infer_shapes_path(str(base), str(inferred))
        model = onnx.load(str(inferred))
    finally:
        inferred.unlink(missing_ok=True)
    model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    return save_onnx(model, out_dir / GRAPH_FILES["onnx"])


def onnx_int8(base: Path, out_dir: Path) -> list[Path]:
    """int8 weights with activations quantized per call (onnxruntime's quantize_dynamic)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / GRAPH_FILES["onnx"]
    quantize_dynamic(
        str(base),
        str(target),
        weight_type=QuantType.QInt8,
        use_external_data_format=base.with_name(ONNX_EXTERNAL_DATA).is_file(),
    )
    return graph_files(target)


def openvino_ir(base, out_dir: Path, precision: str, calibration: Sequence[dict] | None = None) -> list[Path]:
    """Convert ``base`` (an ONNX file, or a function that returns a fresh ``ov.Model``) to OpenVINO IR in
    ``precision`` (fp32, fp16, int8 or w8a8)."""
    import openvino as ov

    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(base, Path):
        model = ov.convert_model(str(base))
        # convert_model folds a no-op Cast that follows an input into it and gives the input the Cast's name
        # too (the safety checker's clip_input also becomes "/vision_model/.../Cast_output_0"); keep only the
        # ONNX input's own name, which runtimes look the input up by.
        for port in model.inputs:
            port.get_tensor().set_names({port.get_node().get_friendly_name()})
    else:
        model = base()
    if precision == "int8":
        import nncf

        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    elif precision == "w8a8":
        import nncf

        if not calibration:
            raise ValueError("w8a8 needs calibration inputs")
        model = nncf.quantize(
            model,
            nncf.Dataset(list(calibration)),
            subset_size=len(calibration),
            model_type=nncf.ModelType.TRANSFORMER,
            fast_bias_correction=True,
        )
    target = out_dir / GRAPH_FILES["openvino"]
    ov.save_model(model, str(target), compress_to_fp16=precision == "fp16")
    return graph_files(target)


def derive(fmt: str, precision: str, base, out_dir: Path, calibration: Sequence[dict] | None = None) -> list[Path]:
    """Write variant (``fmt``, ``precision``) of the part whose fp32 ONNX graph is ``base`` into ``out_dir``."""
    if fmt == "openvino":
        return openvino_ir(base, out_dir, precision, calibration)
    if precision == "fp16":
        return onnx_fp16(base, out_dir)
    if precision == "int8":
        return onnx_int8(base, out_dir)
    raise ValueError(f"no way to derive {fmt} {precision}")
