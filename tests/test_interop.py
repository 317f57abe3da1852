"""Interop both ways with Hugging Face optimum: folders written by `optimum-cli export` run in sdlite
unchanged, and sdlite's folders run in optimum's ONNX Runtime and OpenVINO pipelines."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sdlite import Pipeline

PROMPT = "a red circle on a blue background"
SEED = 5
STEPS = 4
# fp32 graphs from two exporters on the same weights and noise: kernel-order differences only.
ATOL = 2e-3

optimum_cli = shutil.which("optimum-cli", path=str(Path(sys.executable).parent))
pytestmark = [
    pytest.mark.torch,
    pytest.mark.skipif(optimum_cli is None, reason="optimum-cli not installed (bench extra)"),
]


def _ours(folder: Path, engine: str) -> np.ndarray:
    pipe = Pipeline.load(folder, engine=engine, compute="f32")
    return pipe.txt2img(PROMPT, steps=STEPS, seed=SEED, sampler="DDIM", output_type="np", progress=False)


@pytest.fixture(scope="module")
def own_images(tiny_onnx) -> dict[str, np.ndarray]:
    return {engine: _ours(tiny_onnx, engine) for engine in ("onnx", "openvino")}


@pytest.mark.parametrize(
    ("kind", "engine", "extra"),
    [("onnx", "onnx", []), ("openvino", "openvino", ["--weight-format", "fp32"])],
)
def test_optimum_export_runs_in_sdlite(tiny_diffusers, own_images, tmp_path, kind, engine, extra):
    out = tmp_path / kind
    subprocess.run(
        [optimum_cli, "export", kind, "--model", str(tiny_diffusers), "--task", "text-to-image", *extra, str(out)],
        check=True,
        capture_output=True,
    )
    assert not (out / "sdlite.json").exists()
    image = _ours(out, engine)
    assert np.max(np.abs(image - own_images[engine])) < ATOL


@pytest.fixture(scope="module")
def both_formats(tiny_diffusers, tmp_path_factory) -> Path:
    from sdlite.convert.converter import convert

    out = tmp_path_factory.mktemp("interop") / "both"
    convert(str(tiny_diffusers), out, formats=["onnx", "openvino"], quiet=True)
    return out


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_sdlite_folder_runs_in_optimum(ddim_reference, both_formats, runtime):
    if runtime == "onnxruntime":
        from optimum.onnxruntime import ORTStableDiffusionPipeline

        pipe = ORTStableDiffusionPipeline.from_pretrained(both_formats)
    else:
        from optimum.intel import OVStableDiffusionPipeline

        pipe = OVStableDiffusionPipeline.from_pretrained(both_formats, ov_config={"INFERENCE_PRECISION_HINT": "f32"})
    from diffusers import DDIMScheduler

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    image = pipe(
        PROMPT,
        num_inference_steps=STEPS,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator("cpu").manual_seed(SEED),
    ).images
    reference = ddim_reference(PROMPT, STEPS, SEED)
    assert np.max(np.abs(image - reference)) < ATOL
    # And sdlite itself, with the `cpu` noise source, draws the same latents as that torch generator.
    assert np.max(np.abs(_ours(both_formats, "onnx") - reference)) < ATOL


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    """The tiny SDXL recipe, sdlite's conversion of it (both formats) and diffusers' image."""
    from diffusers import StableDiffusionXLPipeline

    from sdlite.convert.converter import convert
    from sdlite.models.recipes import build

    root = tmp_path_factory.mktemp("sdxl-interop")
    source = build("tiny-sdxl", root / "source")
    convert(str(source), root / "both", formats=["onnx", "openvino"], quiet=True)
    reference = StableDiffusionXLPipeline.from_pretrained(source)
    reference.set_progress_bar_config(disable=True)
    image = reference(
        PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED), output_type="np"
    ).images
    return source, root / "both", image


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_sdlite_sdxl_folder_runs_in_optimum(sdxl, runtime):
    if runtime == "onnxruntime":
        from optimum.onnxruntime import ORTStableDiffusionXLPipeline

        pipe = ORTStableDiffusionXLPipeline.from_pretrained(sdxl[1])
    else:
        from optimum.intel import OVStableDiffusionXLPipeline

        pipe = OVStableDiffusionXLPipeline.from_pretrained(sdxl[1], ov_config={"INFERENCE_PRECISION_HINT": "f32"})
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        PROMPT, num_inference_steps=STEPS, generator=torch.Generator().manual_seed(SEED), output_type="np"
    ).images
    assert np.max(np.abs(image - sdxl[2])) < ATOL


@pytest.mark.parametrize(("kind", "extra"), [("onnx", []), ("openvino", ["--weight-format", "fp32"])])
def test_optimum_sdxl_export_runs_in_sdlite(sdxl, tmp_path, kind, extra):
    out = tmp_path / kind
    command = [optimum_cli, "export", kind, "--model", str(sdxl[0]), "--task", "text-to-image", *extra, str(out)]
    subprocess.run(command, check=True, capture_output=True)
    pipe = Pipeline.load(out, engine="onnx" if kind == "onnx" else "openvino", compute="f32")
    assert pipe.folder.family == "sdxl"
    # diffusers' SDXL default: CFG 5 and the scheduler's own sampler (Euler).
    image = pipe.txt2img(PROMPT, steps=STEPS, cfg_scale=5.0, seed=SEED, output_type="np", progress=False)
    assert np.max(np.abs(image - sdxl[2])) < ATOL
