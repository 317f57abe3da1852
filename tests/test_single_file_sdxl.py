"""SDXL checkpoints in one file (base, refiner, inpainting; the layout model sites distribute), unpacked offline:
the same weights and configs as the diffusers folder they were written from, and a conversion that generates what
diffusers' StableDiffusionXLPipeline generates."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from ldm_layout import LDM_SHAPED_WIDTHS, to_ldm_state
from safetensors.torch import save_file

from sdlite import Pipeline
from sdlite.cli import main
from sdlite.convert.loading import load_checkpoint
from sdlite.errors import InputError
from sdlite.rng import NoiseGenerator

pytestmark = pytest.mark.torch

# What the tiny recipes' tensors cannot show (their toy GroupNorm groups and attention heads): the metadata entry a
# file may carry.
_TINY_ARCHITECTURE = {
    "unet": {"norm_num_groups": 8, "attention_head_dim": [4, 8], "sample_size": 8},
    "vae": {"norm_num_groups": 8},
    "text_encoder": {"num_attention_heads": 4},
    "text_encoder_2": {"num_attention_heads": 4},
}
_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def _pipe(name: str, seed: int = 0):
    from sdlite.models.recipes import RECIPES, build_sdxl_pipeline

    return build_sdxl_pipeline(RECIPES[name], seed)


def _save(state: dict, path, architecture: dict | None = _TINY_ARCHITECTURE):
    metadata = {"sdlite.architecture": json.dumps(architecture)} if architecture else None
    save_file(state, path, metadata=metadata)
    return path


def _assert_same_model(loaded, pipe) -> None:
    for part in _PARTS:
        ours, theirs = getattr(loaded, part), getattr(pipe, part)
        assert (ours is None) == (theirs is None), part
        if ours is None:
            continue
        assert type(ours) is type(theirs), part
        sa, sb = ours.state_dict(), theirs.state_dict()
        assert sa.keys() == sb.keys(), part
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{part}.{key}"
    for key in (
        "block_out_channels",
        "down_block_types",
        "transformer_layers_per_block",
        "cross_attention_dim",
        "addition_embed_type",
        "addition_time_embed_dim",
        "projection_class_embeddings_input_dim",
        "use_linear_projection",
        "in_channels",
    ):
        assert json.dumps(loaded.unet.config[key]) == json.dumps(pipe.unet.config[key]), key


@pytest.mark.parametrize(
    ("name", "kind", "flags"),
    [
        ("tiny-sdxl", "StableDiffusionXLPipeline", {"force_zeros_for_empty_prompt": True}),
        ("tiny-sdxl-refiner", "StableDiffusionXLImg2ImgPipeline", {"requires_aesthetics_score": True}),
        ("tiny-sdxl-inpaint", "StableDiffusionXLInpaintPipeline", {"force_zeros_for_empty_prompt": True}),
    ],
)
def test_sdxl_file_loads_the_same_model(name, kind, flags, tmp_path):
    pipe = _pipe(name)
    architecture = {k: v for k, v in _TINY_ARCHITECTURE.items() if getattr(pipe, k) is not None}
    path = _save(to_ldm_state(pipe), tmp_path / f"{name}.safetensors", architecture)
    loaded = load_checkpoint(str(path), scratch_parent=tmp_path).pipe
    assert type(loaded).__name__ == kind
    _assert_same_model(loaded, pipe)
    assert all(loaded.config[flag] == value for flag, value in flags.items())
    assert loaded.tokenizer_2.pad_token == "!"
    if loaded.tokenizer is not None:
        assert loaded.tokenizer.pad_token == "<|endoftext|>"
    assert loaded.vae.config.scaling_factor == pytest.approx(0.13025)
    assert type(loaded.scheduler).__name__ == "EulerDiscreteScheduler"
    assert loaded.scheduler.config.prediction_type == "epsilon"
    # The unpacked folder is gone once loaded (its files stay mapped until the pipeline is freed).
    assert not list(tmp_path.glob(".sdlite-unpack-*"))


def test_sdxl_shaped_file_needs_no_metadata(tmp_path):
    """At widths where SDXL's own hyperparameters hold (32 groups, 64-wide heads), every size comes from the
    tensors, including the time-id embedding width; half-precision files load as float32; the v-prediction and
    zero-terminal-SNR markers that such checkpoints carry reach the scheduler."""
    from sdlite.models.recipes import RECIPES, build_sdxl_pipeline

    widths = dataclasses.replace(
        RECIPES["tiny-sdxl"],
        **LDM_SHAPED_WIDTHS,
        unet_channels=(64, 128),
        unet_head_dim=64,
        text2_hidden=128,
        text2_ffn=256,
        text2_heads=2,
    )
    pipe = build_sdxl_pipeline(widths, seed=3)
    state = {k: v.half() for k, v in to_ldm_state(pipe).items()}
    state.update({"v_pred": torch.zeros(0), "ztsnr": torch.zeros(0)})
    path = _save(state, tmp_path / "sdxl-vpred.safetensors", architecture=None)
    loaded = load_checkpoint(str(path)).pipe
    reference = build_sdxl_pipeline(widths, seed=3).to(torch.float16).to(torch.float32)
    _assert_same_model(loaded, reference)
    assert loaded.unet.config.attention_head_dim == [1, 2]
    assert loaded.text_encoder_2.config.num_attention_heads == 2
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    assert loaded.scheduler.config.rescale_betas_zero_snr


def test_converted_sdxl_file_generates_what_diffusers_generates(tmp_path):
    """sdlite convert on the single file, then txt2img, against diffusers on the recipe's own folder."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from sdlite.models.recipes import build

    folder = build("tiny-sdxl", tmp_path / "tiny-sdxl")
    reference = StableDiffusionXLPipeline.from_pretrained(folder)
    reference.set_progress_bar_config(disable=True)
    path = _save(to_ldm_state(reference), tmp_path / "tiny-sdxl-file.safetensors")
    out = tmp_path / "converted"
    assert main(["convert", str(path), str(out), "--quiet"]) == 0
    manifest = json.loads((out / "sdlite.json").read_text())
    assert manifest["family"] == "sdxl" and manifest["name"] == "tiny-sdxl-file"

    width, height, steps, seed = 64, 48, 5, 7
    latents = NoiseGenerator(seed).randn((1, 4, height // 8, width // 8))
    reference.scheduler = EulerDiscreteScheduler.from_config(reference.scheduler.config)
    expected = reference(
        "a red circle",
        negative_prompt="blurry",
        num_inference_steps=steps,
        guidance_scale=6.0,
        width=width,
        height=height,
        latents=torch.from_numpy(latents),
        output_type="np",
    ).images
    got = Pipeline.load(out).txt2img(
        "a red circle",
        negative_prompt="blurry",
        steps=steps,
        cfg_scale=6.0,
        sampler="Euler",
        seed=seed,
        width=width,
        height=height,
        output_type="np",
        progress=False,
    )
    # fp32 ONNX against fp32 PyTorch, as for the folder's own conversion.
    assert float(np.abs(got - expected).max()) < 2e-3


def test_sdxl_file_whose_time_ids_do_not_add_up_is_refused(tmp_path):
    pipe = _pipe("tiny-sdxl")
    state = to_ldm_state(pipe)
    key = "model.diffusion_model.label_emb.0.0.weight"
    state[key] = torch.cat([state[key], state[key][:, :1]], dim=1)  # one value more than pooled + 6 ids
    path = _save(state, tmp_path / "odd.safetensors")
    with pytest.raises(InputError, match="not the pooled text width plus 6 time-id embeddings"):
        load_checkpoint(str(path), scratch_parent=tmp_path)
    assert not list(tmp_path.glob(".sdlite-unpack-*"))
