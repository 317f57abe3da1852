"""The ``tiny-sdxl`` recipe: SDXL base's layout at toy width, a working diffusers ``StableDiffusionXLPipeline``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdlite.models.recipes import SDXL_VAE_SCALING, build


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return build("tiny-sdxl", tmp_path_factory.mktemp("recipe") / "tiny-sdxl")


def test_tiny_sdxl_has_sdxl_base_layout(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    width_1, width_2 = pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipe.text_encoder.config.hidden_act == "quick_gelu" and pipe.text_encoder_2.config.hidden_act == "gelu"
    # OpenAI CLIP repeats the end token as padding; OpenCLIP pads with "!".
    assert pipe.tokenizer.pad_token == "<|endoftext|>" and pipe.tokenizer_2.pad_token == "!"
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time" and unet.use_linear_projection
    assert unet.cross_attention_dim == width_1 + width_2
    assert unet.projection_class_embeddings_input_dim == pipe.text_encoder_2.config.projection_dim + 6 * 8
    assert unet.down_block_types[0] == "DownBlock2D"  # no attention at the first level, as in SDXL
    assert pipe.vae.config.scaling_factor == SDXL_VAE_SCALING
    assert pipe.config.force_zeros_for_empty_prompt


def test_tiny_sdxl_generates(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red square",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
