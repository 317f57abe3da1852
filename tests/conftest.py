"""Shared fixtures: the tiny model as a diffusers folder and converted by sdlite (built once per session)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_diffusers(tmp_path_factory) -> Path:
    """The ``tiny`` recipe saved as a diffusers folder."""
    from sdlite.models.recipes import build

    return build("tiny", tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_onnx(tiny_diffusers, tmp_path_factory) -> Path:
    """The tiny model converted to ONNX fp32 by ``sdlite.convert``."""
    from sdlite.convert.converter import convert

    out = tmp_path_factory.mktemp("converted") / "tiny-onnx"
    convert(str(tiny_diffusers), out, quiet=True)
    return out


@pytest.fixture(scope="session")
def text_model_dir(tiny_diffusers, tmp_path_factory):
    """The tiny model with a trained-looking final LayerNorm, converted by sdlite.

    Freshly initialised, the final LayerNorm has weight 1 and bias 0, so every token's output has mean 0
    and the emphasis rescale (original mean / weighted mean) divides noise by noise. Random weight and an
    offset bias give the chunk a mean well away from 0 (as in real CLIP) and make the clip-skip norm's
    parameters matter."""
    import torch
    from transformers import CLIPTextModel

    from sdlite.convert.converter import convert

    source = tmp_path_factory.mktemp("emphasis") / "diffusers"
    shutil.copytree(tiny_diffusers, source)
    model = CLIPTextModel.from_pretrained(source / "text_encoder")
    norm = model.text_model.final_layer_norm
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(norm.weight.shape, generator=gen))
        norm.bias.copy_(0.3 + 0.2 * torch.randn(norm.bias.shape, generator=gen))
    model.save_pretrained(source / "text_encoder")
    out = source.parent / "onnx"
    convert(str(source), out, quiet=True)
    return source, out


@pytest.fixture(scope="session")
def ddim_reference(tiny_diffusers):
    """``reference(prompt, steps, seed)``: diffusers' StableDiffusionPipeline on the tiny weights with DDIM
    and a torch CPU generator, decoded images (1, 64, 64, 3) in 0..1; the yardstick sdlite's runs are held to."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_diffusers, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def reference(prompt: str, steps: int, seed: int):
        generator = torch.Generator("cpu").manual_seed(seed)
        return pipe(
            prompt, num_inference_steps=steps, height=64, width=64, output_type="np", generator=generator
        ).images

    return reference
