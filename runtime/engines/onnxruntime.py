"""onnxruntime engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from sdlite.engines import GraphEdit
from sdlite.errors import InputError, engine_failure, summarize

_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}
# sdlite device names -> onnxruntime execution providers that serve them, in order of preference.
_DEVICE_PROVIDERS = {
    "CPU": ["CPUExecutionProvider"],
    "GPU": ["CUDAExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider", "CoreMLExecutionProvider"],
}


def _providers(device: str) -> list[str]:
    available = ort.get_available_providers()
    wanted = [p for p in _DEVICE_PROVIDERS.get(device.upper(), []) if p in available]
    if not wanted:
        have = sorted({name for name, providers in _DEVICE_PROVIDERS.items() if set(providers) & set(available)})
        raise InputError(f"--device {device}: not available to onnxruntime here; available: {', '.join(have)}")
    return wanted


class OnnxRuntimeEngine:
    """One ONNX graph in an onnxruntime session."""

    def __init__(self, path: Path, device: str = "CPU", threads: int | None = None, edit: GraphEdit | None = None):
        if not path.is_file():
            raise InputError(f"{path}: missing ONNX file (the model folder is incomplete; convert again)")
        self._path = path
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        model: str | bytes = str(path)
        if edit is not None:
            model = edit.edit_onnx(path.read_bytes(), path)
            # A graph given as bytes has no folder of its own to resolve external weight files against.
            options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
        try:
            self._session = ort.InferenceSession(model, options, providers=_providers(device))
        except InputError:
            raise
        except Exception as exc:  # onnxruntime raises several types for unreadable graphs
            raise InputError(f"{path}: corrupt or unreadable ONNX file ({summarize(exc)})") from None
        self._inputs = {i.name: i for i in self._session.get_inputs()}
        self.input_names = list(self._inputs)
        self.output_names = [meta.name for meta in self._session.get_outputs()]

    def _fit(self, name: str, value: np.ndarray) -> np.ndarray:
        meta = self._inputs[name]
        value = np.asarray(value, dtype=_DTYPES.get(meta.type))
        # optimum's U-Net takes a scalar timestep, older exports a (batch,) vector: accept either.
        if len(meta.shape) == 0 and value.ndim == 1:
            value = value[:1].reshape(())
        return value

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the session on the graph's declared inputs."""
        feeds = {name: self._fit(name, inputs[name]) for name in self.input_names}
        try:
            outputs = self._session.run(None, feeds)
        except Exception as exc:  # onnxruntime raises its own types (allocation failures among them)
            raise engine_failure("onnxruntime", self._path, exc) from None
        return {meta.name: value for meta, value in zip(self._session.get_outputs(), outputs, strict=True)}

    def release(self) -> None:
        """Drop the session (onnxruntime frees its arena with it)."""
        self._session = None
