"""How much memory each step of a conversion needs, and the check that the whole plan fits a budget.

A conversion runs one step at a time (one part's export, then each of its variants) and frees everything
between steps, so its peak is the largest step's. Each step's need is estimated from the part's float32
weight bytes ``W`` before any work starts, from peaks measured on the full SD 1.5 parts (``W`` = 3.44 GB for
the U-Net; docs/memory.md): the export holds the module's weights and traces; converting to OpenVINO IR or
quantizing holds the graph's weights about twice (the read graph and the written one); validating holds the
compiled graph; W8A8 calibration also runs the float32 graph on calibration samples, whose activations grow
with the latent area. A fixed term covers the libraries (torch, OpenVINO, onnxruntime, NNCF).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from sdlite.errors import InputError

GB = 1e9
# Resident memory of the converter's libraries before any weights are read.
LIBRARIES_BYTES = 0.9 * GB
# Peak of each kind of step per float32 weight byte of the part (over the libraries' share).
PER_WEIGHT_BYTE = {
    "export": 1.1,
    "calibrate": 1.2,
    "openvino": 1.1,
    "onnx-fp16": 1.6,
    "onnx-int8": 1.6,
    "int8": 1.1,
    "w8a8": 1.2,
    "validate": 1.2,
}
# W8A8 calibration's activations per latent cell of one calibration sample (SD 1.5 U-Net, batch 1).
W8A8_BYTES_PER_LATENT_CELL = 0.45e6
# Memory the converter leaves to the rest of the machine when no budget is given.
HEADROOM = 0.9


@dataclass(frozen=True)
class Step:
    """One step of a conversion and its estimated peak."""

    part: str
    variant: str
    kind: str
    need_bytes: float


def step_need(kind: str, weight_bytes: int, latent_cells: int = 0) -> float:
    """Estimated peak resident bytes of a step of ``kind`` on a part of ``weight_bytes`` float32 weights."""
    need = LIBRARIES_BYTES + PER_WEIGHT_BYTE[kind] * weight_bytes
    if kind == "w8a8":
        need += W8A8_BYTES_PER_LATENT_CELL * latent_cells
    return need


def available_bytes() -> int | None:
    """Memory the system can give now (Linux ``MemAvailable``), or None where it is not known."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def default_budget() -> float | None:
    """The budget when none is given: what the machine has free now, less headroom."""
    free = available_bytes()
    return None if free is None else HEADROOM * free


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
