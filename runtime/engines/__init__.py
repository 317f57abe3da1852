"""Engines run one exported graph. Pipelines see only this interface, never the runtime behind it."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from sdlite.engines.token_table import TokenRows
from sdlite.errors import InputError

ENGINES = ("onnx", "openvino")
# The graph formats each engine reads, preferred first (OpenVINO reads ONNX files directly too).
ENGINE_FORMATS = {"onnx": ("onnx",), "openvino": ("openvino", "onnx")}
# Arithmetic precisions a caller may ask for; "auto" is the device's default (bf16 on CPUs that have it).
COMPUTE_PRECISIONS = ("auto", "f32", "bf16", "f16")


class Engine(Protocol):
    """One loaded graph."""

    input_names: list[str]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph; inputs are cast to the dtypes and ranks the graph declares."""

    def release(self) -> None:
        """Free the graph's memory; the engine cannot run afterwards."""


def check_engine(engine: str) -> None:
    """Raise a one-line error for an engine name sdlite does not know."""
    if engine not in ENGINES:
        raise InputError(f"--engine {engine}: unknown engine; known engines: {', '.join(ENGINES)}")


def load_engine(
    path: Path,
    engine: str = "onnx",
    device: str = "CPU",
    threads: int | None = None,
    compute: str = "auto",
    token_rows: TokenRows | None = None,
) -> Engine:
    """Load the graph at ``path`` in ``engine`` on ``device``, computing in ``compute`` precision.
    ``token_rows`` (text encoders only) are appended to the token-embedding table of the loaded copy of
    the graph (textual inversion; ``sdlite.engines.token_table``)."""
    check_engine(engine)
    if engine == "onnx":
        from sdlite.engines.onnxruntime import OnnxRuntimeEngine

        if compute not in ("auto", "f32"):
            raise InputError(f"--compute {compute}: onnxruntime on CPU computes in f32; use --engine openvino")
        return OnnxRuntimeEngine(path, device=device, threads=threads, token_rows=token_rows)
    from sdlite.engines.openvino import OpenVinoEngine

    return OpenVinoEngine(path, device=device, threads=threads, compute=compute, token_rows=token_rows)
