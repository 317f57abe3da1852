"""Every format x precision x attention variant on the tiny model: it validates, it runs, and its image is
within the precision's tolerance of the fp32 PyTorch reference. Plus corrupt and missing variant files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from sdlite import Pipeline
from sdlite.benchmarks.fidelity import psnr
from sdlite.errors import InputError

# Every test here needs torch: every precision converted from the tiny model; diffusers' images are the reference.
pytestmark = pytest.mark.torch

PROMPT = "a red circle on a blue background"
SEED = 11
STEPS = 4
# Decoded-image tolerances against diffusers/PyTorch fp32 on the same noise. fp32 graphs differ only in
# kernel order; reduced precisions are judged by PSNR (dB). Measured on the tiny model (random weights):
# fp16 72-75 dB, int8 41-48, w8a8 39, bf16 arithmetic 47; the bounds leave room for other CPUs.
FP32_ATOL = 2e-3
MIN_PSNR = {"fp16": 55.0, "int8": 32.0, "w8a8": 30.0, "bf16": 36.0}


@pytest.fixture(scope="module")
def reference(ddim_reference) -> np.ndarray:
    return ddim_reference(PROMPT, STEPS, SEED)


@pytest.fixture(scope="module", params=["sliced", "fused"])
def attention_variant(request, tiny_diffusers, tmp_path_factory):
    from sdlite.convert.converter import convert

    out = tmp_path_factory.mktemp("attention") / request.param
    convert(str(tiny_diffusers), out, formats=["onnx", "openvino"], attention=request.param, quiet=True)
    return out


def _generate(folder, engine: str, precision: str, compute: str = "f32") -> np.ndarray:
    pipe = Pipeline.load(folder, engine=engine, precision=precision, compute=compute)
    return pipe.txt2img(PROMPT, steps=STEPS, seed=SEED, sampler="DDIM", output_type="np", progress=False)


def test_manifest_lists_every_validated_variant(all_precisions):
    manifest = json.loads((all_precisions / "sdlite.json").read_text())
    for part, variants in manifest["components"].items():
        held = {(v["format"], v["precision"]) for v in variants}
        expected = {(f, p) for f in ("onnx", "openvino") for p in ("fp32", "fp16", "int8")} | {("openvino", "w8a8")}
        assert held == expected, part
        for variant in variants:
            assert variant["validation"]["passed"], (part, variant["format"], variant["precision"])
            for path in variant["files"]:
                assert (all_precisions / path).is_file()
    # optimum finds the first precision where it looks; the others sit in subfolders.
    assert (all_precisions / "unet" / "openvino_model.xml").is_file()
    assert (all_precisions / "unet" / "int8" / "openvino_model.bin").is_file()


@pytest.mark.parametrize("engine", ["onnx", "openvino"])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "w8a8"])
def test_each_precision_generates_within_tolerance(all_precisions, reference, engine, precision):
    if engine == "onnx" and precision == "w8a8":
        pytest.skip("w8a8 is an OpenVINO variant")
    image = _generate(all_precisions, engine, precision)
    assert np.isfinite(image).all()
    if precision == "fp32":
        assert np.max(np.abs(image - reference)) < FP32_ATOL
    else:
        assert psnr(image, reference) > MIN_PSNR[precision]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_bf16_arithmetic(all_precisions, reference, precision):
    image = _generate(all_precisions, "openvino", precision, compute="bf16")
    assert np.isfinite(image).all()
    assert psnr(image, reference) > MIN_PSNR["bf16"]


@pytest.mark.parametrize("engine", ["onnx", "openvino"])
def test_attention_variants_match_fp32_reference(attention_variant, reference, engine):
    manifest = json.loads((attention_variant / "sdlite.json").read_text())
    # Sliced attention is an onnxruntime memory saving; OpenVINO's IR comes from the plain graph (README).
    expected_openvino = "plain" if attention_variant.name == "sliced" else attention_variant.name
    held = {(v["format"], v["attention"]) for v in manifest["components"]["unet"]}
    assert held == {("onnx", attention_variant.name), ("openvino", expected_openvino)}
    image = _generate(attention_variant, engine, "fp32")
    assert np.max(np.abs(image - reference)) < FP32_ATOL
    if attention_variant.name == "sliced" and engine == "openvino":
        sliced = (attention_variant / "unet" / "model.onnx").read_bytes().count(b"Softmax")
        assert (attention_variant / "unet" / "openvino_model.xml").read_bytes().count(b'type="SoftMax"') < sliced
    if attention_variant.name == "fused":
        graph = attention_variant / "unet" / ("model.onnx" if engine == "onnx" else "openvino_model.xml")
        fused_op = b"MultiHeadAttention" if engine == "onnx" else b"ScaledDotProductAttention"
        assert fused_op in graph.read_bytes()


def test_variant_not_held_is_named(all_precisions):
    with pytest.raises(InputError, match="holds"):
        Pipeline.load(all_precisions, engine="onnx", precision="w8a8")


@pytest.fixture
def damaged(all_precisions, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(all_precisions, copy)
    return copy


def test_missing_bin(damaged):
    (damaged / "unet" / "openvino_model.bin").unlink()
    with pytest.raises(InputError, match=r"openvino_model\.bin: missing"):
        Pipeline.load(damaged, engine="openvino", precision="fp32")


def test_corrupt_ir(damaged):
    xml = damaged / "vae_decoder" / "openvino_model.xml"
    xml.write_text(xml.read_text()[:500])
    with pytest.raises(InputError, match="corrupt"):
        Pipeline.load(damaged, engine="openvino", precision="fp32")


def test_truncated_bin(damaged):
    weights = damaged / "text_encoder" / "openvino_model.bin"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(InputError):
        Pipeline.load(damaged, engine="openvino", precision="fp32").txt2img(PROMPT, steps=1, progress=False)


@pytest.mark.parametrize("low_memory", [False, True])
def test_openvino_blob_cache_hit_gives_the_same_image(tiny_onnx, tmp_path, monkeypatch, low_memory):
    """Compiled blobs are cached in both modes (a hit peaks lower than a fresh compile now that mapped pages
    are given back, README) and a second start from them draws the same image."""
    monkeypatch.setenv("SDLITE_CACHE", str(tmp_path))
    images = [
        Pipeline.load(tiny_onnx, engine="openvino", low_memory=low_memory).txt2img(
            PROMPT, steps=1, seed=0, output_type="np", progress=False
        )
        for _ in range(2)
    ]
    assert list(tmp_path.rglob("*.blob"))
    np.testing.assert_array_equal(images[0], images[1])


def test_openvino_weights_file_is_not_kept_resident(all_precisions):
    """The compiled model holds its own copy of the weights: the mapped IR weights file is given back."""
    from test_mapped_pages import resident_bytes

    pipe = Pipeline.load(all_precisions, engine="openvino", precision="fp32", compute="f32", low_memory=False)
    pipe.txt2img(PROMPT, steps=1, seed=SEED, sampler="DDIM", output_type="np", progress=False)
    weights = all_precisions / "unet" / "openvino_model.bin"
    assert resident_bytes(weights) < weights.stat().st_size / 2
