"""Engines run one exported graph. Pipelines see only this interface, never the runtime behind it."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from sdlite.errors import InputError

ENGINES = ("onnx", "openvino")
# The graph formats each engine reads, preferred first (OpenVINO reads ONNX files directly too).
ENGINE_FORMATS = {"onnx": ("onnx",), "openvino": ("openvino", "onnx")}
# Arithmetic precisions a caller may ask for; "auto" is the device's default (bf16 on CPUs that have it).
COMPUTE_PRECISIONS = ("auto", "f32", "bf16", "f16")


class GraphEdit(Protocol):
    """A change to the loaded copy of a graph, never to its file (textual inversion adds token-table rows to the
    text encoder, ``sdlite.token_table``). An engine applies it to the graph it reads, before compiling."""

    def edit_onnx(self, model: bytes, path: Path) -> bytes:
        """The serialized ONNX graph read from ``path``, edited."""

    def edit_openvino(self, model, path: Path) -> None:
        """Edit the ``openvino.Model`` read from ``path`` in place."""


class Engine(Protocol):
    """One loaded graph."""

    input_names: list[str]
    output_names: list[str]

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
    edit: GraphEdit | None = None,
) -> Engine:
    """Load the graph at ``path`` in ``engine`` on ``device``, computing in ``compute`` precision, with ``edit``
    applied to the loaded copy of the graph when given."""
    check_engine(engine)
    if engine == "onnx":
        from sdlite.engines.onnxruntime import OnnxRuntimeEngine

        if compute not in ("auto", "f32"):
            raise InputError(f"--compute {compute}: onnxruntime on CPU computes in f32; use --engine openvino")
        return OnnxRuntimeEngine(path, device=device, threads=threads, edit=edit)
    from sdlite.engines.openvino import OpenVinoEngine

    return OpenVinoEngine(path, device=device, threads=threads, compute=compute, edit=edit)
