"""Export one PyTorch module to an ONNX file that onnxruntime and OpenVINO both read."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import onnx
import torch

from sdlite.convert.parts import OPSET, PartSpec
from sdlite.layout import GRAPH_FILES, ONNX_EXTERNAL_DATA, graph_files

# protobuf cannot hold more than 2 GB in one message: bigger graphs keep their weights in a side file.
_PROTOBUF_LIMIT = 2**31 - 1
_ALIGNMENT = 4096


def export_onnx(spec: PartSpec, module: torch.nn.Module, dummy: dict[str, torch.Tensor], out_dir: Path) -> list[Path]:
    """Trace ``module`` with ``dummy`` inputs and write ``out_dir/model.onnx`` (plus one external-data file
    when the weights exceed protobuf's 2 GB limit). Returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    module.eval()
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{spec.name}-trace-") as scratch:
        traced = Path(scratch) / "model.onnx"
        dynamic_axes = {**spec.inputs, **spec.outputs}
        with torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of dynamo, but it is the one that exports
            # diffusers' U-Net with free batch, height and width (dynamo guards on shape arithmetic).
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                tuple(dummy[name] for name in spec.inputs),
                str(traced),
                input_names=list(spec.inputs),
                output_names=list(spec.outputs),
                dynamic_axes={name: axes for name, axes in dynamic_axes.items() if axes},
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        # Re-save so that a big model has exactly one external-data file (the exporter writes one per
        # tensor), named as optimum names it; the weights are copied file to file, never all held at once.
        return gather_external_data(traced, out_dir / GRAPH_FILES["onnx"])


def gather_external_data(source: Path, target: Path) -> list[Path]:
    """Save the ONNX file ``source`` as ``target`` with all its external initializers in one external-data file
    beside it (or none, when ``source`` has none), copying one tensor at a time."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(str(source), load_external_data=False)
    # The exporter writes only initializers as external data.
    tensors = [t for t in model.graph.initializer if uses_external_data(t)]
    if not tensors:
        onnx.save_model(model, str(target))
        return graph_files(target)
    with ExternalDataWriter(target.parent) as writer:
        for tensor in tensors:
            info = ExternalDataInfo(tensor)
            with open(source.parent / info.location, "rb") as chunk:
                chunk.seek(info.offset or 0)
                payload = chunk.read(info.length) if info.length else chunk.read()
            writer.put(tensor, payload)
    onnx.save_model(model, str(target))
    return graph_files(target)


class ExternalDataWriter:
    """Appends tensors' bytes to a folder's one external-data file and points each tensor at its bytes."""

    def __init__(self, folder: Path):
        self.file = open(folder / ONNX_EXTERNAL_DATA, "wb")  # noqa: SIM115 (closed by close())

    def put(self, tensor, payload: bytes) -> None:
        """Write ``payload`` as ``tensor``'s data (aligned as onnx aligns the tensors it writes, which lets
        runtimes map them in place)."""
        self.file.write(b"\0" * (-self.file.tell() % _ALIGNMENT))
        offset = self.file.tell()
        self.file.write(payload)
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", ONNX_EXTERNAL_DATA), ("offset", offset), ("length", len(payload))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)

    def close(self) -> None:
        """Close the file."""
        self.file.close()

    def __enter__(self) -> ExternalDataWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def save_onnx(model, target: Path) -> list[Path]:
    """Save an ONNX model, with one external-data file when it is over protobuf's 2 GB limit."""
    size = sum(t.ByteSize() for t in model.graph.initializer)
    if size > _PROTOBUF_LIMIT:
        onnx.save_model(
            model,
            str(target),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=ONNX_EXTERNAL_DATA,
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(target))
    return graph_files(target)
