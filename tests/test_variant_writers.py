"""The converter's memory-bounded variant writers equal the tools they stand in for, on the tiny model:
- ONNX fp16 and int8, written one weight at a time, equal what onnxruntime's own float16 converter and dynamic
  quantizer write from the same fp32 graph: same nodes, same weights, same outputs (bit for bit), for graphs with
  inline weights and with an external-data file;
- the OpenVINO W8A8 U-Net, quantized step by step with the model written to disk between steps, is byte for byte
  the IR that ``nncf.quantize`` makes in one call."""

from __future__ import annotations

import collections
import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from sdlite.convert.onnx_derive import onnx_fp16, onnx_int8
from sdlite.layout import ONNX_EXTERNAL_DATA

PARTS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")


def _reference_fp16(base: Path, out: Path) -> Path:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    out.mkdir(parents=True)
    model = onnx.shape_inference.infer_shapes(onnx.load(str(base)))
    model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True)
    onnx.save_model(model, str(out / "model.onnx"))
    return out / "model.onnx"


def _reference_int8(base: Path, out: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out.mkdir(parents=True)
    quantize_dynamic(str(base), str(out / "model.onnx"), weight_type=QuantType.QInt8)
    return out / "model.onnx"


def _feeds(session: ort.InferenceSession) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for arg in session.get_inputs():
        # Free axes: a batch of 1, 16 tokens or 16 pixels (enough for the VAE encoder's three halvings).
        shape = [dim if isinstance(dim, int) else 1 if axis == 0 else 16 for axis, dim in enumerate(arg.shape)]
        if "int" in arg.type:
            feeds[arg.name] = rng.integers(0, 99, shape).astype(np.int64 if "int64" in arg.type else np.int32)
        else:
            feeds[arg.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def _weights(graph: Path) -> dict[str, np.ndarray]:
    model = onnx.load(str(graph))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.fixture(params=["inline", "external"])
def base_graphs(request, tiny_onnx, tmp_path) -> dict[str, Path]:
    """The tiny model's fp32 graphs, with their weights inline or in one external-data file (as big parts are)."""
    graphs = {}
    for part in PARTS:
        model = onnx.load(str(tiny_onnx / part / "model.onnx"))
        target = tmp_path / "base" / part / "model.onnx"
        target.parent.mkdir(parents=True)
        external = request.param == "external"
        onnx.save_model(
            model, str(target), save_as_external_data=external, location=ONNX_EXTERNAL_DATA, size_threshold=1024
        )
        graphs[part] = target
    return graphs


@pytest.mark.parametrize(("derive", "reference"), [(onnx_fp16, _reference_fp16), (onnx_int8, _reference_int8)])
def test_variant_equals_onnxruntime_tools(base_graphs, tmp_path, derive, reference):
    for part, base in base_graphs.items():
        files = derive(base, tmp_path / "ours" / part)
        external = (base.parent / ONNX_EXTERNAL_DATA).is_file()
        assert [f.name for f in files] == ["model.onnx", *([ONNX_EXTERNAL_DATA] if external else [])]
        theirs = reference(base, tmp_path / "theirs" / part)
        ours_model, theirs_model = onnx.load(str(files[0])), onnx.load(str(theirs))
        assert collections.Counter((n.op_type, n.name) for n in ours_model.graph.node) == collections.Counter(
            (n.op_type, n.name) for n in theirs_model.graph.node
        ), part
        ours_weights, theirs_weights = _weights(files[0]), _weights(theirs)
        assert set(ours_weights) == set(theirs_weights), part
        for name, value in theirs_weights.items():
            assert ours_weights[name].dtype == value.dtype and np.array_equal(ours_weights[name], value), (part, name)
        session = ort.InferenceSession(str(files[0]), providers=["CPUExecutionProvider"])
        feeds = _feeds(session)
        expected = ort.InferenceSession(str(theirs), providers=["CPUExecutionProvider"]).run(None, feeds)
        for got, want in zip(session.run(None, feeds), expected, strict=True):
            np.testing.assert_array_equal(got, want)


def test_w8a8_steps_equal_nncf_quantize(tiny_onnx, tmp_path):
    import nncf
    import openvino as ov

    from sdlite.convert.variants import onnx_to_openvino, save_ir
    from sdlite.convert.w8a8 import quantize_w8a8

    base = save_ir(onnx_to_openvino(tiny_onnx / "unet" / "model.onnx"), tmp_path / "base")[0]
    rng = np.random.default_rng(0)
    width = ov.Core().read_model(str(base)).input("encoder_hidden_states").get_partial_shape()[2].get_length()
    samples = [
        {
            "sample": rng.standard_normal((1, 4, 8, 8)).astype(np.float32),
            "timestep": np.asarray(900.0 - 150 * i, dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((1, 77, width)).astype(np.float32),
        }
        for i in range(6)
    ]
    nncf.set_log_level(40)
    theirs = nncf.quantize(
        ov.Core().read_model(str(base)),
        nncf.Dataset(samples),
        subset_size=len(samples),
        model_type=nncf.ModelType.TRANSFORMER,
        fast_bias_correction=True,
    )
    ours = quantize_w8a8(ov.Core().read_model(str(base)), samples, tmp_path / "scratch")
    assert (tmp_path / "scratch" / "step0.bin").is_file()  # the model between the two statistics runs
    assert not (tmp_path / "scratch" / "step0-weights").exists()  # SmoothQuant's weights, moved into it
    ours_files, theirs_files = save_ir(ours, tmp_path / "ours"), save_ir(theirs, tmp_path / "theirs")
    for mine, reference in zip(ours_files, theirs_files, strict=True):
        assert hashlib.sha256(mine.read_bytes()).digest() == hashlib.sha256(reference.read_bytes()).digest(), mine.name


def test_w8a8_statistics_by_pieces_match_whole_model(tiny_onnx, tmp_path):
    """A model too large to compile at once collects its statistics one piece at a time: the quantized model has
    the same quantizers as ``nncf.quantize``'s, with ranges equal up to float32 rounding, and the same outputs."""
    import nncf
    import openvino as ov
    from openvino.properties.hint import inference_precision

    from sdlite.convert.variants import onnx_to_openvino, save_ir
    from sdlite.convert.w8a8 import quantize_w8a8
    from sdlite.convert.w8a8_statistics import cut_into_pieces, weight_bytes

    base = save_ir(onnx_to_openvino(tiny_onnx / "unet" / "model.onnx"), tmp_path / "base")[0]
    model = ov.Core().read_model(str(base))
    rng = np.random.default_rng(1)
    width = model.input("encoder_hidden_states").get_partial_shape()[2].get_length()
    samples = [
        {
            "sample": rng.standard_normal((1, 4, 8, 8)).astype(np.float32),
            "timestep": np.asarray(900.0 - 150 * i, dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((1, 77, width)).astype(np.float32),
        }
        for i in range(4)
    ]
    piece_bytes = weight_bytes(model) / 3.5
    assert len(cut_into_pieces(model, piece_bytes)) == 4
    nncf.set_log_level(40)
    theirs = nncf.quantize(
        model,
        nncf.Dataset(samples),
        subset_size=len(samples),
        model_type=nncf.ModelType.TRANSFORMER,
        fast_bias_correction=True,
    )
    ours = quantize_w8a8(ov.Core().read_model(str(base)), samples, tmp_path / "scratch", piece_bytes)

    # Same graph; constants equal up to float32 rounding, which may move an int8 weight by one step.
    mine = [op for op in ours.get_ordered_ops() if op.get_type_name() == "Constant"]
    reference = [op for op in theirs.get_ordered_ops() if op.get_type_name() == "Constant"]
    assert [op.get_type_name() for op in ours.get_ordered_ops()] == [
        op.get_type_name() for op in theirs.get_ordered_ops()
    ]
    moved = total = 0
    for got, want in zip(mine, reference, strict=True):
        got, want = got.get_data(), want.get_data()
        assert got.dtype == want.dtype and got.shape == want.shape
        if want.dtype == np.int8 or want.dtype == np.uint8:
            difference = np.abs(got.astype(np.int16) - want.astype(np.int16))
            assert difference.max(initial=0) <= 1
            moved, total = moved + int(np.count_nonzero(difference)), total + want.size
        else:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(initial=0))
    assert moved <= 1e-3 * total
    # The quantized outputs are as far from the float model's as nncf.quantize's.
    config = {inference_precision: ov.Type.f32}
    exact = ov.Core().compile_model(ov.Core().read_model(str(base)), "CPU", config)(samples[0])[0]
    errors = [
        np.sqrt(np.mean((ov.Core().compile_model(quantized, "CPU", config)(samples[0])[0] - exact) ** 2))
        for quantized in (ours, theirs)
    ]
    assert errors[0] <= 1.25 * errors[1], errors
