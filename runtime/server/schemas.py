"""Request bodies the server accepts, shaped as AUTOMATIC1111's API and OpenAI's images API shape them.

Fields a client sends that are not listed here are ignored (clients send their whole settings object, and
fields of A1111 extensions); nulls mean "the default". Numbers given as strings or as whole floats (``"1.0"``,
``512.0``) are taken, as A1111's own parser takes them. Values are checked where they are used, so the error names
the field and what it should be.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Txt2ImgBody(_Body):
    """``POST /sdapi/v1/txt2img``."""

    prompt: str | None = ""
    negative_prompt: str | None = ""
    styles: list[str] | None = None
    seed: int | None = Field(-1, description="-1: random")
    subseed: int | None = Field(-1, description="variation seed; -1: random")
    subseed_strength: float | None = Field(0.0, description="how far the noise moves towards the variation seed's")
    sampler_name: str | None = None
    sampler_index: str | None = Field(None, description="older name of sampler_name")
    scheduler: str | None = Field(None, description="schedule type: Automatic, Karras, Exponential, ...")
    batch_size: int | None = 1
    n_iter: int | None = 1
    steps: int | None = 20
    cfg_scale: float | None = 7.0
    width: int | None = Field(None, description="default: the model's own size")
    height: int | None = None
    clip_skip: int | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool | None = True
    refiner_checkpoint: str | None = Field(None, description="an SDXL refiner from /sdapi/v1/sd-models; None: none")
    refiner_switch_at: float | None = Field(None, description="fraction of the denoising the refiner takes over at")
    send_images: bool | None = True
    save_images: bool | None = False
    enable_hr: bool | None = False
    hr_scale: float | None = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int | None = 0
    hr_resize_x: int | None = 0
    hr_resize_y: int | None = 0
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = ""
    hr_negative_prompt: str | None = ""
    denoising_strength: float | None = None


class Img2ImgBody(Txt2ImgBody):
    """``POST /sdapi/v1/img2img`` (inpainting when ``mask`` is given)."""

    init_images: list[str] = Field(..., description="base64 images (only the first is used)")
    resize_mode: int | None = Field(0, description="0 stretch, 1 crop, 2 fill (pad), 3 stretch")
    mask: str | None = Field(None, description="base64 mask: white is repainted")
    mask_blur: int | None = 4
    mask_blur_x: int | None = None
    mask_blur_y: int | None = None
    inpainting_fill: int | None = Field(1, description="0 fill, 1 original, 2 latent noise, 3 latent nothing")
    inpaint_full_res: bool | int | None = Field(False, description="repaint only the masked area, at full size")
    inpaint_full_res_padding: int | None = 32
    inpainting_mask_invert: int | bool | None = 0
    include_init_images: bool | None = False


class PngInfoBody(_Body):
    """``POST /sdapi/v1/png-info``."""

    image: str


class OpenAIImageBody(_Body):
    """``POST /v1/images/generations`` (OpenAI's images API); the sdlite fields after ``response_format`` are
    optional extensions."""

    prompt: str
    model: str | None = None
    n: int | None = 1
    size: str | None = Field(None, description="WIDTHxHEIGHT, or auto (the model's own size)")
    response_format: str | None = Field("b64_json", description="b64_json, or url (a data: URL)")
    negative_prompt: str | None = ""
    steps: int | None = None
    cfg_scale: float | None = None
    seed: int | None = -1
    sampler_name: str | None = None
