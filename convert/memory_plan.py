"""How much memory each step of a conversion needs, and the check that the whole plan fits a budget.

A conversion runs one step at a time (one part's export, then each of its variants) and frees everything
between steps, so its peak is the largest step's. Each step's peak and time are estimated from the part's
float32 weight bytes ``W`` before any work starts, fitted to what the full SD 1.5 parts measured: the export
holds the module's weights and traces; OpenVINO conversions hold the graph's weights about once (the one being
written), ONNX fp16/int8 one weight at a time; validating holds the compiled graph; W8A8 calibration also runs
the float32 U-Net on calibration samples, whose activations grow with the latent area. The times weigh the
progress bar's ETA.
"""

from __future__ import annotations

from dataclasses import dataclass

from sdlite.convert.w8a8_statistics import PIECE_BYTES
from sdlite.errors import InputError
from sdlite.vae import available_memory

GB = 1e9
# Resident memory of the converter's libraries (torch, diffusers, OpenVINO, onnxruntime) before any weights.
LIBRARIES_BYTES = 1.1 * GB


@dataclass(frozen=True)
class StepCost:
    """What one kind of step costs: peak bytes ``fixed + per_weight_byte * W + per_conv_byte * C`` and
    ``seconds_per_gb * W / GB`` seconds, for a part of ``W`` float32 weight bytes of which ``C`` are convolution
    kernels; W8A8 steps add their activations and time per latent cell of the calibration samples (the
    quantizer inputs NNCF's statistics runs hold grow with the other layers' weights, ``W - C``). A step that
    compiles at most ``piece_bytes`` of the weights at once holds that share of them and of the activations."""

    per_weight_byte: float
    fixed_bytes: float
    seconds_per_gb: float
    bytes_per_cell: float = 0.0
    seconds_per_gb_cell: float = 0.0
    per_conv_byte: float = 0.0
    per_linear_byte_cell: float = 0.0
    piece_bytes: float = float("inf")


# Fitted to the full SD 1.5 parts (text encoder W = 0.49 GB, U-Net 3.44 GB, VAE 0.33 GB) converted on a 2-core
# CPU (docs/memory.md), about 5% above what they measured. The ONNX fp16 and int8 steps stream the weights, so
# their memory hardly grows with W (the small parts, whose weights sit inside the graph, cost the most per byte).
STEP_COST = {
    "export": StepCost(1.0, 1.3 * GB, 10),
    "calibrate": StepCost(1.0, 0.8 * GB, 0, bytes_per_cell=0.1e6, seconds_per_gb_cell=0.011),
    "openvino": StepCost(1.25, 0.45 * GB, 4),
    "link": StepCost(0.0, 0.0, 0),
    "onnx-fp16": StepCost(0.3, 1.1 * GB, 6),
    "onnx-int8": StepCost(0.3, 1.5 * GB, 2),
    "int8": StepCost(0.2, 0.5 * GB, 5),
    # Also fitted to SDXL's U-Net (W 10.3 GB, C 1.3 GB), whose second statistics run passed 24.4 GB at 64x64 cells
    # when compiled whole (SD 1.5's, 5.4 GB, is then overestimated by a fifth; SDXL's in pieces too).
    "w8a8": StepCost(1.0, 0.3 * GB, 0, seconds_per_gb_cell=0.03, per_linear_byte_cell=3.7e-4, piece_bytes=PIECE_BYTES),
    "validate": StepCost(1.25, 0.35 * GB, 3),
    # The compiled int8 weights and the mapped file (a quarter of W each), and every convolution kernel unpacked
    # to float32 (C): the SD 1.5 U-Net is 69% convolutions (1x1 attention projections included), SDXL's 13%.
    "validate-int8-ir": StepCost(0.5, 0.3 * GB, 3, per_conv_byte=1.2),
}
# Memory the converter leaves to the rest of the machine when no budget is given.
HEADROOM = 0.9


@dataclass(frozen=True)
class Step:
    """One step of a conversion with its estimated peak and seconds."""

    part: str
    variant: str
    kind: str
    need_bytes: float
    seconds: float


def make_step(
    part: str, variant: str, kind: str, weight_bytes: int, latent_cells: int = 0, conv_bytes: int = 0
) -> Step:
    """The step of ``kind`` on a part of ``weight_bytes`` float32 weights, ``conv_bytes`` of them convolution
    kernels (``latent_cells``: the calibration samples' latent area, for W8A8 steps)."""
    cost = STEP_COST[kind]
    gb = weight_bytes / GB
    held = min(weight_bytes, cost.piece_bytes)
    share = held / weight_bytes if weight_bytes else 1.0
    need = (
        LIBRARIES_BYTES
        + cost.fixed_bytes
        + cost.per_weight_byte * held
        + cost.per_conv_byte * conv_bytes
        + cost.bytes_per_cell * latent_cells
        + cost.per_linear_byte_cell * (weight_bytes - conv_bytes) * share * latent_cells
    )
    seconds = cost.seconds_per_gb * gb + cost.seconds_per_gb_cell * gb * latent_cells
    return Step(part, variant, kind, need, max(seconds, 0.1))


def default_budget() -> float:
    """The budget when none is given: what the machine has free now, less headroom."""
    return HEADROOM * available_memory()


def check_plan(steps: list[Step], budget_bytes: float | None, given: bool) -> None:
    """Refuse, in one line and before any work, a plan whose largest step would not fit ``budget_bytes``."""
    if budget_bytes is None or not steps:
        return
    largest = max(steps, key=lambda step: step.need_bytes)
    if largest.need_bytes <= budget_bytes:
        return
    source = f"--memory-budget {budget_bytes / GB:g}" if given else f"{budget_bytes / GB:.1f} GB free now"
    raise InputError(
        f"{source}: the {largest.part} {largest.variant} {largest.kind} step needs about "
        f"{largest.need_bytes / GB:.1f} GB; free memory, raise --memory-budget, or leave that variant out"
    )
