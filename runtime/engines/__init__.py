"""Engines run one exported graph. Pipelines see only this interface, never the runtime behind it."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from sdlite.errors import InputError

ENGINES = ("onnx",)


class Engine(Protocol):
    """One loaded graph."""

    input_names: list[str]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph; inputs are cast to the dtypes and ranks the graph declares."""

    def release(self) -> None:
        """Free the graph's memory; the engine cannot run afterwards."""


def load_engine(path: Path, engine: str = "onnx", device: str = "CPU", threads: int | None = None) -> Engine:
    """Load the graph at ``path`` in ``engine`` on ``device``."""
    if engine == "onnx":
        from sdlite.engines.onnxruntime import OnnxRuntimeEngine

        return OnnxRuntimeEngine(path, device=device, threads=threads)
    raise InputError(f"--engine {engine}: unknown engine; known engines: {', '.join(ENGINES)}")
