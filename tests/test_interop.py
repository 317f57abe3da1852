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
