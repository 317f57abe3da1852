"""Check an exported part against its PyTorch module on inputs it was not traced with.

fp32 exports must match elementwise (numpy.allclose with the part's atol/rtol). Reduced precisions are
judged by the relative RMS error of each output (rms(export - torch) / rms(torch)), with one bound per
precision: fp16 rounding stays near 1e-3, int8 weights near 1e-2, int8 activations several times more.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sdlite.convert.parts import PartSpec
from sdlite.errors import SdliteError

RELATIVE_RMS_BOUND = {"fp16": 2e-2, "int8": 1e-1, "w8a8": 3e-1}


@dataclass(frozen=True)
class Validation:
    """The outcome of comparing one export with PyTorch."""

    part: str
    variant: str
    max_abs_diff: dict[str, float]
    relative_rms: dict[str, float]
    bound: str
    passed: bool

    def describe(self) -> str:
        """One line for the console: mark, part, and the max |diff| of every output."""
        mark = "ok" if self.passed else "FAILED"
        diffs = ", ".join(
            f"{name} max|diff| {value:.2e} rel.rms {self.relative_rms[name]:.1e}"
            for name, value in self.max_abs_diff.items()
        )
        return f"[{mark}] {self.part} {self.variant}: {diffs} ({self.bound})"

    def to_json(self) -> dict:
        """The manifest's form."""
        return {
            "max_abs_diff": self.max_abs_diff,
            "relative_rms": self.relative_rms,
            "bound": self.bound,
            "passed": self.passed,
        }


class ValidationError(SdliteError):
    """An export whose outputs differ from PyTorch by more than the part's tolerance."""


def reference_outputs(spec: PartSpec, module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """The PyTorch module's outputs on ``inputs``, in the spec's output order."""
    with torch.no_grad():
        outputs = module(*(inputs[name] for name in spec.inputs))
    if isinstance(outputs, torch.Tensor):
        outputs = (outputs,)
    return [out.numpy() for out in outputs]


def run_graph(graph: Path, spec: PartSpec, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run an ONNX file in onnxruntime or an IR in OpenVINO (f32 arithmetic, so only the weights differ)."""
    if graph.suffix == ".xml":
        import openvino as ov

        from sdlite.engines.mapped_pages import ReleasedWhileRunning

        # The compiled model holds its own copy of the weights, made while compiling or, with dynamic shapes, at
        # the first call: the mapped file's pages are handed back meanwhile (the fp32 SD 1.5 U-Net: 3.7 GB peak
        # against 6.3 GB).
        with ReleasedWhileRunning([graph.parent]):
            compiled = ov.Core().compile_model(str(graph), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
            results = compiled(feeds)
        by_name = {port.get_any_name(): value for port, value in results.items()}
        return [np.asarray(by_name[name]) for name in spec.outputs]
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # The graph as written, without onnxruntime's rewrites: on CPU its optimizer folds the Casts it puts before
    # every fp16 weight into float32 copies of them (the fp16 SD 1.5 U-Net: 6.0 GB against 3.1 GB unoptimized).
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    return session.run(list(spec.outputs), feeds)


def validate_graph(
    spec: PartSpec,
    graph: Path,
    inputs: dict[str, np.ndarray],
    reference: list[np.ndarray],
    precision: str,
    variant: str,
) -> Validation:
    """Compare ``graph``'s outputs with the PyTorch ``reference`` under ``precision``'s tolerance."""
    got = run_graph(graph, spec, {name: inputs[name] for name in spec.inputs})
    diffs, relative, passed = {}, {}, True
    for name, ours, ref in zip(spec.outputs, got, reference, strict=True):
        ours = np.asarray(ours, dtype=np.float32)
        if ours.shape != ref.shape:
            raise ValidationError(f"{spec.name}: output {name} has shape {ours.shape}, PyTorch gives {ref.shape}")
        diffs[name] = float(np.max(np.abs(ours - ref))) if ref.size else 0.0
        relative[name] = float(np.sqrt(np.mean((ours - ref) ** 2)) / max(np.sqrt(np.mean(ref**2)), 1e-12))
        if precision == "fp32":
            passed &= bool(np.allclose(ours, ref, atol=spec.atol, rtol=spec.rtol))
        else:
            passed &= relative[name] <= RELATIVE_RMS_BOUND[precision]
    bound = (
        f"atol {spec.atol:g}, rtol {spec.rtol:g}"
        if precision == "fp32"
        else f"rel.rms <= {RELATIVE_RMS_BOUND[precision]:g}"
    )
    return Validation(spec.name, variant, diffs, relative, bound, passed)
