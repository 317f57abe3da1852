"""Single-file checkpoints in the original SD layout, converted offline, equal the diffusers folder."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ldm_layout import LDM_SHAPED_WIDTHS, open_clip_state, to_ldm_state
from safetensors.torch import save_file

from sdlite.cli import main
from sdlite.convert.loading import load_checkpoint
from sdlite.convert.single_file import detect_family
from sdlite.errors import InputError

# Every test here needs torch: sdlite.convert's single-file loading against diffusers.
pytestmark = pytest.mark.torch


# A real SD 1.x file's shape, shrunk (the tiny recipe's 8 U-Net heads are SD 1.x's too).
def _ldm_widths():
    from sdlite.models.recipes import RECIPES

    return dataclasses.replace(RECIPES["tiny"], **LDM_SHAPED_WIDTHS)


@pytest.fixture(scope="module")
def tiny_single_file(tiny_diffusers, tmp_path_factory):
    """The tiny model as one SD-layout file, its toy hyperparameters in sdlite's metadata entry."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_diffusers)
    path = tmp_path_factory.mktemp("single") / "tiny-ldm.safetensors"
    architecture = {
        "unet": {"norm_num_groups": 8, "sample_size": 8},
        "vae": {"norm_num_groups": 8},
        "text_encoder": {"num_attention_heads": 4},
    }
    save_file(to_ldm_state(pipe), path, metadata={"sdlite.architecture": json.dumps(architecture)})
    return path


def _assert_same_weights(a, b) -> None:
    for part in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys(), part
        for key in sa:
            assert torch.equal(sa[key], sb[key]), f"{part}.{key}"


def test_tiny_single_file_loads_the_same_weights(tiny_diffusers, tiny_single_file):
    from diffusers import StableDiffusionPipeline

    reference = StableDiffusionPipeline.from_pretrained(tiny_diffusers)
    loaded = load_checkpoint(str(tiny_single_file))
    _assert_same_weights(loaded.pipe, reference)
    assert loaded.pipe.unet.config.norm_num_groups == 8
    assert loaded.pipe.scheduler.config.prediction_type == "epsilon"
    assert loaded.name == "tiny-ldm" and len(loaded.sha256) == 64


def test_ldm_shaped_model_needs_no_metadata(tmp_path):
    from sdlite.models.recipes import build_pipeline

    pipe = build_pipeline(_ldm_widths(), seed=3)
    path = tmp_path / "model.safetensors"
    save_file(to_ldm_state(pipe), path)
    loaded = load_checkpoint(str(path)).pipe
    _assert_same_weights(loaded, pipe)
    for part in ("unet", "vae"):
        for key in ("block_out_channels", "layers_per_block", "norm_num_groups"):
            ours, theirs = getattr(loaded, part).config[key], getattr(pipe, part).config[key]
            assert json.dumps(ours) == json.dumps(theirs), (part, key)
    assert loaded.text_encoder.config.num_attention_heads == 1
    # fp16 files (the usual download) load as float32.
    half = tmp_path / "half.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in to_ldm_state(pipe).items()}, half)
    assert load_checkpoint(str(half)).pipe.unet.conv_in.weight.dtype == torch.float32


def test_exports_equal_the_folder_exports(tiny_single_file, tiny_onnx, tmp_path):
    """sdlite convert on the single file: every ONNX part computes what the folder's export computes."""
    import onnxruntime as ort

    from sdlite.layout import PARTS as COMPONENTS

    out = tmp_path / "from-file"
    assert main(["convert", str(tiny_single_file), str(out), "--quiet"]) == 0
    manifest = json.loads((out / "sdlite.json").read_text())
    assert manifest["family"] == "sd15" and manifest["name"] == "tiny-ldm"
    rng = np.random.default_rng(0)
    inputs = {
        "text_encoder": {"input_ids": rng.integers(0, 49408, (1, 77)).astype(np.int64)},
        "unet": {
            "sample": rng.standard_normal((1, 4, 8, 8)).astype(np.float32),
            "timestep": np.array(500.0, dtype=np.float32),
            "encoder_hidden_states": rng.standard_normal((1, 77, 32)).astype(np.float32),
        },
        "vae_decoder": {"latent_sample": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)},
        "vae_encoder": {"sample": rng.standard_normal((1, 3, 64, 64)).astype(np.float32)},
    }
    assert sorted(inputs) == sorted(COMPONENTS)
    for part, feed in inputs.items():
        ours = ort.InferenceSession(str(out / part / "model.onnx"))
        theirs = ort.InferenceSession(str(tiny_onnx / part / "model.onnx"))
        feed = {i.name: _cast(feed[i.name], i.type) for i in ours.get_inputs()}
        for a, b in zip(ours.run(None, feed), theirs.run(None, feed), strict=True):
            assert np.abs(a - b).max() < 1e-5, part


def _cast(array: np.ndarray, onnx_type: str) -> np.ndarray:
    return array.astype(np.float32 if "float" in onnx_type else np.int64)


def test_family_detection():
    unet = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}
    clip = {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(1)}
    assert detect_family({**unet, **clip}, "x") == "sd15"
    context = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    openclip = {"cond_stage_model.model.token_embedding.weight": torch.zeros(1)}
    assert detect_family({**unet, **openclip, context: torch.zeros(320, 1024)}, "x") == "sd2"
    sdxl_clip = {"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(1)}
    bigg = {"conditioner.embedders.1.model.token_embedding.weight": torch.zeros(1)}
    assert detect_family({**unet, **sdxl_clip, **bigg}, "x") == "sdxl"
    assert detect_family({**unet, "conditioner.embedders.0.model.token_embedding.weight": torch.zeros(1)}, "x") == (
        "sdxl-refiner"
    )
    with pytest.raises(InputError, match="SDXL-style text encoders sdlite does not know"):
        detect_family({**unet, **bigg}, "x")
    with pytest.raises(InputError, match="not a Stable Diffusion checkpoint"):
        detect_family({"lora_unet_x.lora_down.weight": torch.zeros(1)}, "x")


def test_incomplete_sdxl_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "sdxl.safetensors"
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 4, 3, 3),
            "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(2, 2),
            "conditioner.embedders.1.model.token_embedding.weight": torch.zeros(2, 2),
        },
        path,
    )
    assert main(["convert", str(path), str(tmp_path / "out"), "--quiet"]) == 2
    assert "no VAE weights" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".sdlite-*"))


def test_pickled_single_file_with_flag(tiny_single_file, tmp_path):
    from safetensors.torch import load_file

    from sdlite.models.recipes import build_pipeline

    pipe = build_pipeline(_ldm_widths(), seed=4)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": to_ldm_state(pipe), "global_step": 1}, ckpt)
    with pytest.raises(InputError, match="--allow-pickle"):
        load_checkpoint(str(ckpt))
    _assert_same_weights(load_checkpoint(str(ckpt), allow_pickle=True).pipe, pipe)

    # A pickle has no metadata: the toy model's 16-channel VAE does not fit 32 GroupNorm groups.
    toy = tmp_path / "toy.ckpt"
    torch.save(load_file(tiny_single_file), toy)
    with pytest.raises(InputError, match="do not fit sd15's defaults"):
        load_checkpoint(str(toy), allow_pickle=True)


def test_sd2_layout_toy(tmp_path):
    """OpenCLIP text keys and linear projections: detected as sd2, loaded with the same weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(5)
    unet = UNet2DConditionModel(
        block_out_channels=(64, 64, 128, 128),
        layers_per_block=1,
        attention_head_dim=(1, 1, 2, 2),  # 64-wide heads, as SD 2.x
        cross_attention_dim=64,
        use_linear_projection=True,
        sample_size=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1, hidden_act="gelu"
        )
    )
    pipe = SimpleNamespace(unet=unet, vae=vae, text_encoder=text)
    state = {k: v for k, v in to_ldm_state(pipe).items() if not k.startswith("cond_stage_model.")}
    last = {f"ln_1.{p}": torch.randn(64) for p in ("weight", "bias")}
    state.update(open_clip_state(text, "cond_stage_model.model.", torch.randn(64, 16), last))
    path = tmp_path / "sd2.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)

    loaded = load_checkpoint(str(path)).pipe
    _assert_same_weights(loaded, pipe)
    assert loaded.unet.config.use_linear_projection and loaded.unet.config.cross_attention_dim == 64
    assert loaded.text_encoder.config.hidden_act == "gelu" and loaded.text_encoder.config.num_hidden_layers == 2
    assert loaded.tokenizer.pad_token == "!"
    assert loaded.scheduler.config.prediction_type in ("epsilon", "v_prediction")
