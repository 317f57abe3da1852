"""Build Stable Diffusion models offline, from a fixed seed, as diffusers folders.

``tiny``: the SD 1.5 architecture (same block types, attention layout, VAE depth and CLIP text encoder
with the real BPE vocabulary) at toy width; random weights; built in seconds, for tests.
``tiny-safety``: ``tiny`` with a toy safety checker (diffusers' ``StableDiffusionSafetyChecker`` on a small
random CLIP vision tower) whose one live concept is "red": images whose embedding is close to a solid red
image's are flagged. For the safety-checker tests.
``tiny-lcm``: ``tiny`` as a latent consistency model (a U-Net with a guidance-scale embedding input,
``time_cond_proj_dim``, and diffusers' LCMScheduler), as LCM-distilled checkpoints are.
``tiny-sd2-v``: the SD 2.x layout (linear attention projections, per-level head counts, GELU text encoder, "!"
padding) at toy width, predicting v (Salimans & Ho 2022) as SD 2.x 768 models do.
``sd15-random``: the full SD 1.5 architecture (859.5M-parameter U-Net) with random weights, for speed
and memory figures.
``tiny-sdxl``: the SDXL base layout (two CLIP text encoders, the second with a projection; a U-Net with
linear attention projections, transformer depth per level, no attention at the first level, and the "text_time"
added conditioning on the pooled text embedding and six size/crop numbers) at toy width.
``tiny-sdxl-refiner``: the SDXL refiner's layout (only the second text encoder; five time ids, the last an
aesthetic score), a diffusers ``StableDiffusionXLImg2ImgPipeline``. ``tiny-sdxl-inpaint``: ``tiny-sdxl`` with a
9-channel inpainting U-Net (``StableDiffusionXLInpaintPipeline``).
``sdxl-random``: the full SDXL base architecture (2.57B-parameter U-Net, both text encoders, the VAE) with random
weights, for speed and memory figures (14 GB on disk in float32).
``tiny-taesd``: a tiny autoencoder (diffusers' AutoencoderTiny) with TAESD's own architecture, which is small
already, and random weights: convert it beside a model with ``sdlite convert --tiny-vae``.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sdlite.convert.atomic import atomic_output_dir
from sdlite.layout import DEFAULT_VAE_SCALING
from sdlite.models.clip_vocab import write_clip_tokenizer

# SD 1.5's own scheduler configuration (runwayml/stable-diffusion-v1-5, scheduler_config.json).
SD15_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "trained_betas": None,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
}
# An LCM checkpoint's scheduler (SimianLuo/LCM_Dreamshaper_v7, scheduler_config.json).
LCM_SCHEDULER = {
    **SD15_SCHEDULER,
    "original_inference_steps": 50,
    "timestep_scaling": 10.0,
    "set_alpha_to_one": True,
    "steps_offset": 1,
}
# SDXL base's (stabilityai/stable-diffusion-xl-base-1.0, scheduler_config.json): Euler on the SD 1.5 betas.
SDXL_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "clip_sample": False,
    "trained_betas": None,
    "prediction_type": "epsilon",
}
# SDXL's VAE latent scale (its config's scaling_factor).
SDXL_VAE_SCALING = 0.13025
# SD 2.x 768-v's (stabilityai/stable-diffusion-2-1): DDIM on the SD 1.5 betas, predicting v.
SD2_V_SCHEDULER = {**SD15_SCHEDULER, "prediction_type": "v_prediction"}


@dataclass(frozen=True)
class Widths:
    """The few numbers that scale the SD 1.5 architecture down."""

    unet_channels: tuple[int, ...]
    unet_layers: int
    unet_head_dim: int
    unet_groups: int
    vae_channels: tuple[int, ...]
    vae_layers: int
    vae_groups: int
    text_hidden: int
    text_ffn: int
    text_layers: int
    text_heads: int
    sample_size: int
    # 9 for inpainting U-Nets: noisy latents (4) + mask (1) + masked-image latents (4).
    unet_in_channels: int = 4
    # A toy safety checker and its feature extractor (see ``tiny_safety_checker``).
    safety_checker: bool = False
    # Width of a latent consistency U-Net's guidance-scale embedding input (None: a regular U-Net).
    time_cond_proj_dim: int | None = None
    # SD 2.x's layout: linear attention projections, heads per level, GELU text encoder, v prediction.
    sd2: bool = False
    # SDXL's layout (see ``build_sdxl_pipeline``): transformer blocks per level (none at the first), the second
    # text encoder's width and layers, and the width of each of the six added time ids' embeddings.
    sdxl_transformer_layers: tuple[int, ...] = ()
    text2_hidden: int = 0
    text2_ffn: int = 0
    text2_layers: int = 0
    text2_heads: int = 0
    time_embed_dim: int = 0
    # The SDXL refiner's layout: no first text encoder, the aesthetic score in place of the target size.
    sdxl_refiner: bool = False


_TINY = Widths(
    unet_channels=(32, 32, 64, 64),
    unet_layers=1,
    unet_head_dim=8,
    unet_groups=8,
    vae_channels=(16, 16, 32, 32),
    vae_layers=1,
    vae_groups=8,
    text_hidden=32,
    text_ffn=64,
    text_layers=2,
    text_heads=4,
    sample_size=8,
)

# SDXL's layout at toy width: two U-Net levels (SDXL has three), the first without attention.
_TINY_SDXL = dataclasses.replace(
    _TINY,
    unet_channels=(32, 64),
    sdxl_transformer_layers=(0, 2),
    text2_hidden=48,
    text2_ffn=96,
    text2_layers=3,
    text2_heads=4,
    time_embed_dim=8,
)

_SD15 = Widths(
    unet_channels=(320, 640, 1280, 1280),
    unet_layers=2,
    unet_head_dim=8,
    unet_groups=32,
    vae_channels=(128, 256, 512, 512),
    vae_layers=2,
    vae_groups=32,
    text_hidden=768,
    text_ffn=3072,
    text_layers=12,
    text_heads=12,
    sample_size=64,
)

RECIPES: dict[str, Widths] = {
    "tiny": _TINY,
    "tiny-inpaint": dataclasses.replace(_TINY, unet_in_channels=9),
    "tiny-safety": dataclasses.replace(_TINY, safety_checker=True),
    "tiny-lcm": dataclasses.replace(_TINY, time_cond_proj_dim=32),
    "tiny-sd2-v": dataclasses.replace(_TINY, sd2=True),
    "tiny-sdxl": _TINY_SDXL,
    "tiny-sdxl-refiner": dataclasses.replace(_TINY_SDXL, sdxl_refiner=True),
    "tiny-sdxl-inpaint": dataclasses.replace(_TINY_SDXL, unet_in_channels=9),
    "sd15-random": _SD15,
    # stabilityai/stable-diffusion-xl-base-1.0's configs: three U-Net levels with 0, 2 and 10 transformer blocks,
    # 64-wide heads, OpenAI CLIP ViT-L and OpenCLIP ViT-bigG text encoders, 256-wide time-id embeddings.
    "sdxl-random": dataclasses.replace(
        _SD15,
        unet_channels=(320, 640, 1280),
        unet_head_dim=64,
        sample_size=128,
        sdxl_transformer_layers=(0, 2, 10),
        text2_hidden=1280,
        text2_ffn=5120,
        text2_layers=32,
        text2_heads=20,
        time_embed_dim=256,
    ),
}


# The toy checker's live concepts: a solid colour each, and the cosine similarity above which an image counts as
# that concept. On the random tower, a solid red image is at cosine 0.96 from orange, 0.93 from dark red, 0.90
# from yellow, 0.67 from green and 0.39 from blue. The special-care concept ("green") adds diffusers' 0.01
# adjustment to every concept score of an image that triggers it.
RED, GREEN = (220, 30, 30), (30, 200, 30)
SAFETY_CONCEPT_THRESHOLD = 0.92
SAFETY_SPECIAL_THRESHOLD = 0.97


def tiny_safety_checker(seed: int = 0):
    """A ``StableDiffusionSafetyChecker`` with a 2-layer, 32-wide CLIP vision tower (random weights, 224x224
    input, 32-pixel patches) and its ``CLIPImageProcessor``.

    Concept 0 is the projected embedding of a solid red image with threshold ``SAFETY_CONCEPT_THRESHOLD``,
    special-care concept 0 that of a solid green one with ``SAFETY_SPECIAL_THRESHOLD``; the other 16 concepts
    and 2 special-care concepts are random directions with threshold 1, which a cosine never exceeds."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from PIL import Image
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4},
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 224,
            "patch_size": 32,
        },
        projection_dim=16,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    processor = CLIPImageProcessor()
    solid = [Image.new("RGB", (64, 64), colour) for colour in (RED, GREEN)]
    with torch.no_grad():
        pixels = processor(solid, return_tensors="pt").pixel_values
        red, green = checker.visual_projection(checker.vision_model(pixels)[1])
        checker.concept_embeds.copy_(torch.randn_like(checker.concept_embeds))
        checker.concept_embeds[0] = red
        checker.concept_embeds_weights.fill_(1.0)
        checker.concept_embeds_weights[0] = SAFETY_CONCEPT_THRESHOLD
        checker.special_care_embeds.copy_(torch.randn_like(checker.special_care_embeds))
        checker.special_care_embeds[0] = green
        checker.special_care_embeds_weights.fill_(1.0)
        checker.special_care_embeds_weights[0] = SAFETY_SPECIAL_THRESHOLD
    return checker, processor


def build_pipeline(widths: Widths, seed: int = 0):
    """Create a ``diffusers.StableDiffusionPipeline`` of the SD 1.5 architecture at the given widths."""
    import torch
    from diffusers import (
        DDIMScheduler,
        LatentConsistencyModelPipeline,
        LCMScheduler,
        PNDMScheduler,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=widths.sample_size,
        in_channels=widths.unet_in_channels,
        block_out_channels=widths.unet_channels,
        layers_per_block=widths.unet_layers,
        # SD 2.x: a head count per level (5, 10, 20, 20 at width 320 in the real model: 64-wide heads).
        attention_head_dim=tuple(c // widths.unet_head_dim for c in widths.unet_channels)
        if widths.sd2
        else widths.unet_head_dim,
        use_linear_projection=widths.sd2,
        norm_num_groups=widths.unet_groups,
        cross_attention_dim=widths.text_hidden,
        time_cond_proj_dim=widths.time_cond_proj_dim,
    )
    vae = _vae(widths)
    text_encoder = CLIPTextModel(
        _clip_text_config(widths.text_hidden, widths.text_ffn, widths.text_layers, widths.text_heads, widths.sd2)
    )
    # OpenCLIP (SD 2.x) pads with "!" (id 0) where OpenAI's CLIP repeats the end token.
    tokenizer = _clip_tokenizer("!" if widths.sd2 else None)
    if widths.time_cond_proj_dim:
        scheduler, pipeline_class = LCMScheduler.from_config(LCM_SCHEDULER), LatentConsistencyModelPipeline
    elif widths.sd2:
        scheduler, pipeline_class = DDIMScheduler.from_config(SD2_V_SCHEDULER), StableDiffusionPipeline
    else:
        scheduler = PNDMScheduler.from_config(SD15_SCHEDULER)
        pipeline_class = StableDiffusionInpaintPipeline if widths.unet_in_channels == 9 else StableDiffusionPipeline
    checker, processor = tiny_safety_checker(seed) if widths.safety_checker else (None, None)
    return pipeline_class(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=checker,
        feature_extractor=processor,
        requires_safety_checker=checker is not None,
    )


def _vae(widths: Widths, scaling_factor: float = DEFAULT_VAE_SCALING):
    """SD's KL autoencoder (4 latent channels, 8 pixels per latent cell at SD's depth) at the given widths."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=widths.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(widths.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(widths.vae_channels),
        layers_per_block=widths.vae_layers,
        norm_num_groups=widths.vae_groups,
        latent_channels=4,
        sample_size=widths.sample_size * 8,
        scaling_factor=scaling_factor,
    )


def _clip_tokenizer(pad_token: str | None = None):
    """A transformers ``CLIPTokenizer`` on the real CLIP vocabulary, padding with ``pad_token`` if given."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tok_dir:
        write_clip_tokenizer(tok_dir)
        return CLIPTokenizer.from_pretrained(tok_dir, **({"pad_token": pad_token} if pad_token else {}))


def _clip_text_config(hidden: int, ffn: int, layers: int, heads: int, open_clip: bool):
    """A CLIP text encoder's config on the real vocabulary: OpenAI CLIP's (quick GELU, padding id 1) or OpenCLIP's
    (GELU, padding with "!", id 0); the projection, where the model has one, keeps the width."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        projection_dim=hidden,
        hidden_act="gelu" if open_clip else "quick_gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=0 if open_clip else 1,
    )


def build_sdxl_pipeline(widths: Widths, seed: int = 0):
    """A diffusers SDXL pipeline of SDXL base's (or refiner's) layout at the given widths.

    As in SDXL base: text encoder 1 is OpenAI CLIP (quick GELU, padding with the end token), text encoder 2 is
    OpenCLIP with a text projection (GELU, padding with "!"); the U-Net's cross-attention width is the two
    encoders' widths together, its added embedding takes the projected pooled text embedding and six time ids;
    head width 64 in the real model (``unet_head_dim`` here); the VAE scales latents by 0.13025. The refiner has
    only the second encoder and five time ids (the last an aesthetic score), and conditions an empty negative
    prompt like any other; a 9-channel U-Net makes an inpainting pipeline."""
    import torch
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    refiner = widths.sdxl_refiner
    attends = [layers > 0 for layers in widths.sdxl_transformer_layers]
    unet = UNet2DConditionModel(
        sample_size=widths.sample_size,
        in_channels=widths.unet_in_channels,
        block_out_channels=widths.unet_channels,
        layers_per_block=widths.unet_layers,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)),
        attention_head_dim=tuple(max(c // widths.unet_head_dim, 1) for c in widths.unet_channels),
        transformer_layers_per_block=tuple(max(layers, 1) for layers in widths.sdxl_transformer_layers),
        use_linear_projection=True,
        norm_num_groups=widths.unet_groups,
        cross_attention_dim=widths.text2_hidden + (0 if refiner else widths.text_hidden),
        addition_embed_type="text_time",
        addition_time_embed_dim=widths.time_embed_dim,
        projection_class_embeddings_input_dim=widths.text2_hidden + (5 if refiner else 6) * widths.time_embed_dim,
    )
    vae = _vae(widths, SDXL_VAE_SCALING)
    text_encoder = (
        None
        if refiner
        else CLIPTextModel(
            _clip_text_config(widths.text_hidden, widths.text_ffn, widths.text_layers, widths.text_heads, False)
        )
    )
    text_encoder_2 = CLIPTextModelWithProjection(
        _clip_text_config(widths.text2_hidden, widths.text2_ffn, widths.text2_layers, widths.text2_heads, True)
    )
    parts = {
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": None if refiner else _clip_tokenizer(),
        "tokenizer_2": _clip_tokenizer("!"),
        "unet": unet,
        "scheduler": EulerDiscreteScheduler.from_config(SDXL_SCHEDULER),
        "add_watermarker": False,
    }
    if refiner:
        return StableDiffusionXLImg2ImgPipeline(
            **parts, requires_aesthetics_score=True, force_zeros_for_empty_prompt=False
        )
    kind = StableDiffusionXLInpaintPipeline if widths.unet_in_channels == 9 else StableDiffusionXLPipeline
    return kind(**parts, force_zeros_for_empty_prompt=True)


def build_tiny_vae(seed: int = 0):
    """A ``diffusers.AutoencoderTiny`` with TAESD's architecture (SD's 4 latent channels) and random weights."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    return AutoencoderTiny().eval()


# Recipes that are a model part rather than a whole pipeline.
PART_RECIPES = {"tiny-taesd": build_tiny_vae}


def build(name: str, out: str | Path, seed: int = 0) -> Path:
    """Build recipe ``name`` and save it as a diffusers folder at ``out`` (written atomically)."""
    if name not in RECIPES and name not in PART_RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known recipes: {', '.join([*RECIPES, *PART_RECIPES])}")
    if name in PART_RECIPES:
        model = PART_RECIPES[name](seed)
    elif RECIPES[name].sdxl_transformer_layers:
        model = build_sdxl_pipeline(RECIPES[name], seed)
    else:
        model = build_pipeline(RECIPES[name], seed)
    with atomic_output_dir(out) as tmp:
        # One weights file per part, as the hub's folders have (an SDXL U-Net is 10.3 GB in float32; safetensors
        # writes from the tensors' memory, without a copy).
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="100GB")
    return Path(out)
