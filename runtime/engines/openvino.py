"""OpenVINO engine: reads ONNX or OpenVINO IR directly, compiles for CPU, GPU, NPU or AUTO."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset13 as ops

from sdlite.engines import COMPUTE_PRECISIONS, GraphEdit
from sdlite.engines.mapped_pages import ReleasedWhileRunning
from sdlite.errors import InputError, engine_failure, summarize

# sdlite's compute names -> OpenVINO's inference precision hint; "auto" keeps the plugin's choice
# (bf16 on CPUs with AVX512_BF16 or AMX: a full SD 1.5 U-Net step ran about 2x faster than in f32 on a 2-core EPYC).
COMPUTE_HINTS = {name: None if name == "auto" else name for name in COMPUTE_PRECISIONS}
_CORE: ov.Core | None = None
# What an attention mask's "minus infinity" becomes when the graph computes in a reduced precision. Exported CLIP
# text encoders fill their causal mask with float32's lowest value, which is -inf in bf16 and f16, and OpenVINO's
# attention then returns NaN. Half precision's lowest finite value masks as completely: softmax turns any score
# that far below the row's largest into exactly 0, in every precision.
REDUCED_PRECISION_MASK_FILL = float(np.finfo(np.float16).min)


def core() -> ov.Core:
    """One OpenVINO core per process (creating one scans every plugin)."""
    global _CORE
    if _CORE is None:
        _CORE = ov.Core()
    return _CORE


def compute_precision(device: str, compute: str) -> str:
    """The precision the device will compute in, as a short name (f32, bf16, f16)."""
    if COMPUTE_HINTS.get(compute):
        return compute
    try:
        return core().get_property(device, "INFERENCE_PRECISION_HINT").to_string()
    except RuntimeError:  # devices without the property (e.g. AUTO) decide per model
        return "auto"


def _cached_blobs() -> set[str]:
    folder = cache_dir()
    return {entry.name for entry in folder.iterdir()} if folder.is_dir() else set()


def cache_dir() -> Path:
    """Where compiled models are cached, so the second start skips compilation (``SDLITE_CACHE`` overrides)."""
    root = os.environ.get("SDLITE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sdlite")
    return Path(root) / "openvino"


def _finite_mask_fill(model: ov.Model) -> None:
    """Replace every scalar float32 constant holding float32's lowest value (a mask's fill) with
    ``REDUCED_PRECISION_MASK_FILL``, in place."""
    lowest = float(np.finfo(np.float32).min)
    for op in model.get_ordered_ops():
        if (
            op.get_type_name() == "Constant"
            and op.get_element_type() == ov.Type.f32
            and len(op.get_output_shape(0)) == 0
            and float(op.get_data()) == lowest
        ):
            fill = ops.constant(np.float32(REDUCED_PRECISION_MASK_FILL))
            op.output(0).replace(fill.output(0))


class OpenVinoEngine:
    """One graph compiled by OpenVINO for the shapes it is first called with.

    Static shapes ran about 10% faster and held less memory than dynamic ones (SD 1.5 U-Net, 2-core CPU), so
    the graph is reshaped to the concrete input shapes and compiled at the first call, and again only when they
    change.
    Compiled blobs go to a cache folder, which makes the next process start in a fraction of the time."""

    def __init__(
        self,
        path: Path,
        device: str = "CPU",
        threads: int | None = None,
        compute: str = "auto",
        edit: GraphEdit | None = None,
    ):
        if not path.is_file():
            raise InputError(f"{path}: missing model file (the model folder is incomplete; convert again)")
        if path.suffix == ".xml" and not path.with_suffix(".bin").is_file():
            raise InputError(f"{path.with_suffix('.bin')}: missing weights file (convert again)")
        if compute not in COMPUTE_HINTS:
            raise InputError(f"--compute {compute}: unknown; known: {', '.join(COMPUTE_HINTS)}")
        devices = core().available_devices
        if device.upper() != "AUTO" and device.upper().split(".")[0] not in {d.split(".")[0] for d in devices}:
            raise InputError(f"--device {device}: not available to OpenVINO here; available: {', '.join(devices)}")
        self._device = device.upper()
        self._compute = compute
        self._config: dict[str, str] = {"CACHE_DIR": str(cache_dir())} if getattr(edit, "cacheable", True) else {}
        # A compiled model imported from the blob cache holds its own repacked copy of every weight; the weights
        # file (or blob) it came from stays mapped but is barely read again, so its pages are given back as it
        # compiles (a fresh compilation is replaced by such an import, _compile_for).
        self._mapped_folders = [path.parent, cache_dir()]
        if COMPUTE_HINTS[compute]:
            self._config["INFERENCE_PRECISION_HINT"] = COMPUTE_HINTS[compute]
        if threads:
            self._config["INFERENCE_NUM_THREADS"] = str(threads)
        self._path = path
        self._edit = edit
        try:
            self._model: ov.Model | None = self._read()
        except RuntimeError as exc:
            raise InputError(f"{path}: corrupt or unreadable model file ({summarize(exc)})") from None
        # Names, types and ranks only: a port object would keep the graph, and with it the mapped weights
        # file, alive after compilation.
        self._inputs = {
            port.get_any_name(): (port.get_element_type().to_dtype(), port.get_partial_shape().rank.get_length())
            for port in self._model.inputs
        }
        self.input_names = list(self._inputs)
        self.output_names = [port.get_any_name() for port in self._model.outputs]
        self._shapes: tuple | None = None
        self._request = None

    def _read(self) -> ov.Model:
        """The graph from its file, edited when an edit was given."""
        model = core().read_model(str(self._path))
        if self._edit is not None:
            self._edit.edit_openvino(model, self._path)
        if compute_precision(self._device, self._compute) != "f32":
            _finite_mask_fill(model)
        return model

    def _fit(self, name: str, value: np.ndarray) -> np.ndarray:
        dtype, rank = self._inputs[name]
        value = np.asarray(value, dtype=dtype)
        if rank == 0 and value.ndim == 1:
            value = value[:1].reshape(())
        return value

    def _compile_for(self, feeds: dict[str, np.ndarray]) -> None:
        shapes = tuple((name, feeds[name].shape) for name in self.input_names)
        if shapes == self._shapes:
            return
        self._request = None  # free the previous compilation first
        model = self._model if self._model is not None else self._read()
        # A compiled model imported from the cache holds its own weights, and the graph read from disk would keep
        # the whole weights file mapped and resident besides (RssFile): it is dropped, and read again only if the
        # shapes change.
        self._model = None
        blobs = _cached_blobs()
        with ReleasedWhileRunning(self._mapped_folders):
            try:
                model.reshape({name: ov.PartialShape(list(shape)) for name, shape in shapes})
                compiled = core().compile_model(model, self._device, self._config)
                if _cached_blobs() - blobs:
                    # A fresh compilation keeps reading some weights in place from the mapped file, which then
                    # stays resident (W8A8 SD 1.5 U-Net: 165-250 MB after the first call); the blob it has just
                    # cached holds its own copy of everything, so the model is imported from it instead (the
                    # fresh one freed first, so that both are never held).
                    compiled = None
                    compiled = core().compile_model(model, self._device, self._config)
            except RuntimeError:
                # Some NNCF-compressed graphs carry shape constants that fail static shape inference at small
                # sizes; they still run with dynamic shapes.
                try:
                    compiled = core().compile_model(self._read(), self._device, self._config)
                except RuntimeError as exc:
                    raise InputError(f"{self._path}: OpenVINO could not compile it ({summarize(exc)})") from None
        self._request = compiled.create_infer_request()
        self._shapes = shapes

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one inference; outputs are copied out of OpenVINO's buffers."""
        feeds = {name: self._fit(name, inputs[name]) for name in self.input_names}
        self._compile_for(feeds)
        try:
            results = self._request.infer(feeds)
        except RuntimeError as exc:
            raise engine_failure("OpenVINO", self._path, exc) from None
        return {port.get_any_name(): np.array(value) for port, value in results.items()}

    def release(self) -> None:
        """Drop the compiled model, its request and the graph."""
        self._request = None
        self._model = None
