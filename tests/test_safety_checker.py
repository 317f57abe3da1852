"""The checkpoint's safety checker: converted and validated, run by default, equal to diffusers'
``StableDiffusionSafetyChecker`` with ``CLIPImageProcessor`` on the same images.

The model is the ``tiny-safety`` recipe: the tiny model plus a toy checker whose one live concept is "red"
(``sdlite.models.recipes.tiny_safety_checker``), so that red images are flagged and others are not.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdlite import Pipeline
from sdlite.cli import main
from sdlite.engines import load_engine
from sdlite.safety import ClipPreprocessing, check_images, load_preprocessing

# Every test here needs torch: the tiny safety checker is built and converted with torch, and diffusers' checker
# is the reference.
pytestmark = pytest.mark.torch


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    from sdlite.models.recipes import build

    return build("tiny-safety", tmp_path_factory.mktemp("models") / "tiny-safety")


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory) -> Path:
    from sdlite.convert.converter import convert

    out = tmp_path_factory.mktemp("converted") / "tiny-safety"
    convert(str(source), out, formats=["onnx", "openvino"], quiet=True)
    return out


@pytest.fixture(scope="module")
def reference(source):
    """diffusers' own checker and feature extractor, loaded from the source folder."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    checker = StableDiffusionSafetyChecker.from_pretrained(source / "safety_checker").eval()
    processor = CLIPImageProcessor.from_pretrained(source / "feature_extractor")

    def run(images: np.ndarray) -> tuple[np.ndarray, list[bool]]:
        """(N, H, W, 3) floats in 0..1 -> checked images and flags, as StableDiffusionPipeline.run_safety_checker
        computes them (the feature extractor gets the 8-bit PIL images)."""
        pil = [Image.fromarray((image * 255).round().astype(np.uint8)) for image in images]
        clip_input = processor(pil, return_tensors="pt").pixel_values
        with torch.no_grad():
            checked, flags = checker(images=images.copy(), clip_input=clip_input)
        return np.asarray(checked, dtype=np.float32), list(flags)

    return run


def _noisy(colour: tuple[int, int, int], height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    image = np.asarray(colour) * (0.8 + 0.4 * x[..., None] * y[..., None]) + rng.normal(0, 20, (height, width, 3))
    return np.clip(image, 0, 255).round().astype(np.uint8)


# Reds and oranges (flagged), blues, greens (special care, not flagged), yellows and greys; several sizes, so
# that the shortest-side resize both shrinks and enlarges and the centre crop cuts either side.
COLOURS = [(220, 30, 30), (230, 110, 40), (160, 25, 25), (30, 30, 220), (30, 200, 30), (230, 230, 30), (128, 128, 128)]
SIZES = [(64, 64), (64, 96), (300, 200), (224, 224), (513, 257)]


def _test_images() -> list[np.ndarray]:
    return [_noisy(c, *SIZES[i % len(SIZES)], seed=i) for i, c in enumerate(COLOURS * 2)]


def test_convert_exports_the_safety_checker(source, converted):
    manifest = json.loads((converted / "sdlite.json").read_text())
    variants = manifest["components"]["safety_checker"]
    assert [(v["format"], v["precision"]) for v in variants] == [("onnx", "fp32"), ("openvino", "fp32")]
    assert all(v["validation"]["passed"] for v in variants)
    assert list(variants[0]["files"]) == ["safety_checker/model.onnx"]
    # The feature extractor's config travels with it; model_index.json lists the feature extractor but not the
    # checker, which optimum-intel would try to load as PyTorch weights.
    ours = json.loads((converted / "feature_extractor" / "preprocessor_config.json").read_text())
    theirs = json.loads((source / "feature_extractor" / "preprocessor_config.json").read_text())
    assert ours == theirs
    index = json.loads((converted / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None]
    assert index["feature_extractor"] == ["transformers", "CLIPImageProcessor"]
    # diffusers' ONNX names, in the ONNX graph and the IR alike.
    for graph, engine in (("model.onnx", "onnx"), ("openvino_model.xml", "openvino")):
        assert load_engine(converted / "safety_checker" / graph, engine).input_names == ["clip_input", "images"]


def test_preprocessing_equals_clip_image_processor(source):
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor.from_pretrained(source / "feature_extractor")
    ours = load_preprocessing(source)
    # The old CLIPFeatureExtractor form of the same config (int sizes), as SD 1.x checkpoints ship it.
    legacy = ClipPreprocessing.from_config({"size": 224, "crop_size": 224, "resample": 3})
    for image in [*_test_images()[:5], _noisy((10, 200, 90), 20, 30, seed=99)]:
        expected = processor([Image.fromarray(image)], return_tensors="np").pixel_values
        for preprocessing in (ours, legacy):
            got = preprocessing(image[None])
            assert got.shape == expected.shape == (1, 3, 224, 224)
            # Measured 0: the same PIL resize and float32 arithmetic.
            assert np.max(np.abs(got - expected)) <= 1e-4


@pytest.mark.parametrize(("engine", "graph"), [("onnx", "model.onnx"), ("openvino", "openvino_model.xml")])
def test_flags_and_black_images_equal_diffusers(converted, reference, engine, graph):
    checker = load_engine(converted / "safety_checker" / graph, engine, compute="f32")
    preprocessing = load_preprocessing(converted)
    flagged = set()
    for i, image in enumerate(_test_images()):
        pixels = image[None].astype(np.float32) / 255
        ours, flags = check_images(pixels, lambda: checker, preprocessing)
        expected, expected_flags = reference(pixels)
        assert flags == expected_flags
        assert np.array_equal(ours, expected)
        if flags[0]:
            flagged.add(COLOURS[i % len(COLOURS)])
    # Both outcomes occur: the reds and oranges (4 of the 14 images) are flagged, the rest (dark red included,
    # whose shading takes it below the threshold) are not.
    assert flagged == {(220, 30, 30), (230, 110, 40)}


def test_pipeline_runs_the_checker_by_default(converted, reference):
    checked = Pipeline.load(converted)
    unchecked = Pipeline.load(converted, safety_checker=False)
    assert checked.safety_checker and not unchecked.safety_checker
    options = dict(steps=2, seed=4, batch=2, progress=False)
    plain = unchecked.txt2img("a red circle", output_type="np", **options)
    assert plain.nsfw_content_detected is None
    expected, expected_flags = reference(np.asarray(plain))
    images = checked.txt2img("a red circle", output_type="np", **options)
    assert images.nsfw_content_detected == expected_flags
    assert np.array_equal(np.asarray(images), expected)
    # A mostly red image (inpainting keeps everything outside the mask) is flagged and comes back black; a
    # mostly blue one is not.
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (24, 24, 40, 40))
    for colour, flag in (((220, 30, 30), True), ((30, 30, 220), False)):
        result = checked.inpaint("x", Image.new("RGB", (64, 64), colour), mask, steps=2, seed=1, progress=False)
        assert result.nsfw_content_detected == [flag]
        assert (np.asarray(result[0]).max() == 0) == flag
        assert result[0].info["parameters"].startswith("x\nSteps: 2")


def _inpaint(model: Path, image: Path, mask: Path, out: Path, *extra: str) -> list[str]:
    return ["inpaint", "x", "-m", str(model), "--image", str(image), "--mask", str(mask), "--steps", "2"] + [
        "--seed",
        "1",
        "--quiet",
        "-o",
        str(out),
        *extra,
    ]


def test_cli_reports_flagged_images_and_can_turn_the_check_off(converted, tmp_path, capsys):
    image, mask = tmp_path / "red.png", tmp_path / "mask.png"
    Image.new("RGB", (64, 64), (220, 30, 30)).save(image)
    mask_image = Image.new("L", (64, 64), 0)
    mask_image.paste(255, (24, 24, 40, 40))
    mask_image.save(mask)
    out = tmp_path / "out.png"
    assert main(_inpaint(converted, image, mask, out)) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("warning: the model's safety checker flagged 1 of 1 image(s)") and "\n" not in err
    assert str(out) in err and "--no-safety-checker" in err
    assert np.asarray(Image.open(out)).max() == 0
    assert main(_inpaint(converted, image, mask, out, "--no-safety-checker")) == 0
    assert capsys.readouterr().err == ""
    assert np.asarray(Image.open(out)).max() > 0


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_folder_with_a_safety_checker_still_runs_in_optimum(converted, runtime):
    """optimum's pipelines ignore the extra safety_checker folder and load the feature extractor."""
    if runtime == "onnxruntime":
        pytest.importorskip("optimum.onnxruntime")
        from optimum.onnxruntime import ORTStableDiffusionPipeline as Loader
    else:
        pytest.importorskip("optimum.intel")
        from optimum.intel import OVStableDiffusionPipeline as Loader
    pipe = Loader.from_pretrained(converted)
    images = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert images.shape == (1, 64, 64, 3)
