"""Derive the requested formats and precisions of one part from its fp32 ONNX export.

Every variant starts from the part's fp32 export, ONNX or the OpenVINO IR converted from it:
- ONNX fp16: onnxruntime's float16 converter, inputs and outputs kept fp32 (for GPU execution providers), and
  ONNX int8: onnxruntime's dynamic quantization (int8 weights, activations quantized at run time); both written
  one weight at a time (``sdlite.convert.onnx_derive``).
- OpenVINO IR fp32 / fp16: ``ov.convert_model`` on the ONNX file (seconds, against minutes from
  torch: 4 s against 80 s for the SD 1.5 U-Net) once, then saved with or without fp16 weight compression.
- OpenVINO IR int8: NNCF weight compression (INT8_ASYM) of every MatMul/Conv weight.
- OpenVINO IR w8a8 (U-Net only): NNCF post-training quantization of weights *and* activations
  (``sdlite.convert.w8a8``), calibrated on U-Net inputs recorded while generating real prompts (optimum-intel's
  "hybrid" mode does the same);
  the VNNI int8 kernels then hold weights at one byte each and run about 1.5x faster than bf16.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from sdlite.convert.onnx_derive import onnx_fp16, onnx_int8
from sdlite.convert.w8a8 import quantize_w8a8
from sdlite.engines.mapped_pages import ReleasedWhileRunning
from sdlite.layout import GRAPH_FILES, graph_files

FORMATS = ("onnx", "openvino")
PRECISIONS = ("fp32", "fp16", "int8", "w8a8")
# Folders of a variant's intermediate models (a killed conversion leaves them behind: ``remove_steps_left``).
STEPS_PREFIX = ".steps-"
# A name OpenVINO makes from an op type and its process-wide counter ("Constant_1707507", "Constant_1964_1").
_COUNTER_NAME = re.compile(r"[A-Za-z0-9]+(_\d+)+")


def onnx_to_openvino(onnx_file: Path):
    """The ONNX graph as an ``ov.Model`` (fp32), its inputs named as in the ONNX file."""
    import openvino as ov

    model = ov.convert_model(str(onnx_file))
    # convert_model folds a no-op Cast that follows an input into it and gives the input the Cast's name
    # too (the safety checker's clip_input also becomes "/vision_model/.../Cast_output_0"); keep only the
    # ONNX input's own name, which runtimes look the input up by.
    for port in model.inputs:
        port.get_tensor().set_names({port.get_node().get_friendly_name()})
    return model


def save_ir(model, out_dir: Path, compress_to_fp16: bool = False) -> list[Path]:
    """Write ``model`` as ``out_dir/openvino_model.xml`` and its weights file."""
    import openvino as ov

    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / GRAPH_FILES["openvino"]
    _stable_op_names(model)
    ov.save_model(model, str(target), compress_to_fp16=compress_to_fp16)
    return graph_files(target)


def _stable_op_names(model) -> None:
    """Rename each op named by OpenVINO's counter after its place in the graph.

    OpenVINO names the ops it creates after a counter global to the process (``Constant_1707507``, or
    ``Reshape_1699397`` for a constant folded from that reshape), so the same conversion would write different
    files depending on what the process converted before; a resumed conversion must write the files an
    uninterrupted one does."""
    for index, op in enumerate(model.get_ordered_ops()):
        if _COUNTER_NAME.fullmatch(op.get_friendly_name()):
            op.set_friendly_name(f"{op.get_type_name()}_n{index}")


def link_files(sources: Sequence[Path], out_dir: Path) -> list[Path]:
    """``sources`` in ``out_dir`` under their names: hard links where the file system has them, else copies."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for source in sources:
        target = out_dir / source.name
        target.unlink(missing_ok=True)
        try:
            os.link(source, target)
        except OSError:  # a file system without hard links
            shutil.copyfile(source, target)
        files.append(target)
    return files


def openvino_ir(
    base: Path,
    out_dir: Path,
    precision: str,
    calibration: Sequence[dict] | None = None,
    quiet: bool = False,
    scratch: Path | None = None,
) -> list[Path]:
    """Derive OpenVINO IR in ``precision`` (fp32, fp16, int8 or w8a8) from the fp32 IR ``base``; intermediate
    models go to a temporary folder in ``scratch`` (default: beside ``out_dir``).

    The base's weights file is memory-mapped, and its pages are handed back while the variant is made (they
    are read once); so the process holds about one copy of the weights, the one being written."""
    import openvino as ov

    if precision == "fp32":
        # The same files: linked, not copied (the base folder is removed when the conversion ends).
        return link_files(graph_files(base), out_dir)
    scratch = scratch or out_dir.parent
    scratch.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(dir=scratch, prefix=STEPS_PREFIX) as steps,
        ReleasedWhileRunning([base.parent, Path(steps)]),
        _nncf_output(quiet),
    ):
        model = ov.Core().read_model(str(base))
        if precision == "int8":
            import nncf

            model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        elif precision == "w8a8":
            if not calibration:
                raise ValueError("w8a8 needs calibration inputs")
            model = quantize_w8a8(model, calibration, Path(steps))
        # Saved before the scratch folder goes: the model's float weights may still be mapped from it.
        return save_ir(model, out_dir, compress_to_fp16=precision == "fp16")


def remove_steps_left(scratch: Path) -> None:
    """Delete the intermediate models that a killed conversion left in ``scratch`` (up to 18 GB for a W8A8 SDXL
    U-Net)."""
    for folder in scratch.glob(f"{STEPS_PREFIX}*"):
        shutil.rmtree(folder, ignore_errors=True)


def _nncf_output(quiet: bool):
    """NNCF prints its tables and progress bars on stdout; with ``quiet`` they are dropped."""
    if not quiet:
        return contextlib.nullcontext()
    import nncf

    nncf.set_log_level(logging.ERROR)
    return contextlib.redirect_stdout(io.StringIO())


def derive(
    fmt: str,
    precision: str,
    base: Path,
    out_dir: Path,
    calibration: Sequence[dict] | None = None,
    quiet: bool = False,
    scratch: Path | None = None,
) -> list[Path]:
    """Write variant (``fmt``, ``precision``) of a part into ``out_dir``: OpenVINO variants from its fp32 IR
    ``base``, ONNX ones from its fp32 ONNX graph ``base`` (``scratch``: where intermediate files go)."""
    if fmt == "openvino":
        return openvino_ir(base, out_dir, precision, calibration, quiet, scratch)
    if precision == "fp16":
        return onnx_fp16(base, out_dir)
    if precision == "int8":
        return onnx_int8(base, out_dir)
    raise ValueError(f"no way to derive {fmt} {precision}")
