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
    text encoder, ``sdlite.token_table``; LoRAs add branches, ``sdlite.lora_graph``). An engine applies it to the
    graph it reads, before compiling. An edit that adds graph inputs names them in ``extra_inputs`` and gives their
    values at each run from ``feeds()``; one with ``cacheable = False`` keeps its compiled graph out of OpenVINO's
    blob cache."""

    def edit_onnx(self, model: bytes, path: Path) -> bytes:
        """The serialized ONNX graph read from ``path``, edited."""

    def edit_openvino(self, model, path: Path) -> None:
        """Edit the ``openvino.Model`` read from ``path`` in place."""


class EditChain:
    """Several edits of one graph, applied in order; the inputs they add are fed together."""

    def __init__(self, edits: list[GraphEdit]):
        self.edits = list(edits)
        self.cacheable = all(getattr(edit, "cacheable", True) for edit in self.edits)
        self.extra_inputs = tuple(name for edit in self.edits for name in getattr(edit, "extra_inputs", ()))

    def edit_onnx(self, model: bytes, path: Path) -> bytes:
        """Each edit in turn."""
        for edit in self.edits:
            model = edit.edit_onnx(model, path)
        return model

    def edit_openvino(self, model, path: Path) -> None:
        """Each edit in turn."""
        for edit in self.edits:
            edit.edit_openvino(model, path)

    def feeds(self) -> dict[str, np.ndarray]:
        """The values of every input the edits added."""
        return {name: value for edit in self.edits if hasattr(edit, "feeds") for name, value in edit.feeds().items()}


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
        loaded = OnnxRuntimeEngine(path, device=device, threads=threads, edit=edit)
    else:
        from sdlite.engines.openvino import OpenVinoEngine

        loaded = OpenVinoEngine(path, device=device, threads=threads, compute=compute, edit=edit)
    return _FedEngine(loaded, edit) if getattr(edit, "extra_inputs", ()) else loaded


class _FedEngine:
    """An engine whose graph an edit gave extra inputs: callers see the graph's own inputs, the edit feeds the rest."""

    def __init__(self, engine: Engine, edit: GraphEdit):
        self._engine = engine
        self._edit = edit
        self.input_names = [name for name in engine.input_names if name not in edit.extra_inputs]
        self.output_names = engine.output_names

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph with the edit's inputs added."""
        return self._engine.run({**inputs, **self._edit.feeds()})

    def release(self) -> None:
        """Free the graph."""
        self._engine.release()
