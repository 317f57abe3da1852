"""Check an exported part against its PyTorch module on inputs it was not traced with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sdlite.convert.parts import PartSpec
from sdlite.errors import SdliteError


@dataclass(frozen=True)
class Validation:
    """The outcome of comparing one export with PyTorch."""

    part: str
    max_abs_diff: dict[str, float]
    atol: float
    rtol: float
    passed: bool

    def describe(self) -> str:
        """One line for the console: mark, part, and the max |diff| of every output."""
        mark = "ok" if self.passed else "FAILED"
        diffs = ", ".join(f"{name} max|diff| {value:.2e}" for name, value in self.max_abs_diff.items())
        return f"[{mark}] {self.part}: {diffs} (atol {self.atol:g}, rtol {self.rtol:g})"

    def to_json(self) -> dict:
        """The manifest's form."""
        return {"max_abs_diff": self.max_abs_diff, "atol": self.atol, "rtol": self.rtol, "passed": self.passed}


class ValidationError(SdliteError):
    """An export whose outputs differ from PyTorch by more than the part's tolerance."""


def validate_onnx(spec: PartSpec, module: torch.nn.Module, inputs: dict[str, torch.Tensor], model: Path) -> Validation:
    """Run ``model`` in onnxruntime and ``module`` in PyTorch on ``inputs``; compare every output.

    Passes when every element satisfies |onnx - torch| <= atol + rtol * |torch| (numpy.allclose)."""
    import onnxruntime as ort

    with torch.no_grad():
        reference = module(*(inputs[name] for name in spec.inputs))
    if isinstance(reference, torch.Tensor):
        reference = (reference,)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    feeds = {name: inputs[name].numpy() for name in spec.inputs}
    got = session.run(list(spec.outputs), feeds)
    diffs, passed = {}, True
    for name, ours, ref in zip(spec.outputs, got, reference, strict=True):
        ref = ref.numpy()
        if ours.shape != ref.shape:
            raise ValidationError(f"{spec.name}: output {name} has shape {ours.shape}, PyTorch gives {ref.shape}")
        diffs[name] = float(np.max(np.abs(ours - ref))) if ref.size else 0.0
        passed &= bool(np.allclose(ours, ref, atol=spec.atol, rtol=spec.rtol))
    return Validation(spec.name, diffs, spec.atol, spec.rtol, passed)
