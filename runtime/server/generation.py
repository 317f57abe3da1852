"""A1111 generation requests -> pipeline calls, and the results back in A1111's response shape.

A request is checked in the event loop as far as it can be without the model (names, sizes, images), so a bad
one is refused at once; :func:`run` then executes it in the worker thread. A1111's semantics kept here:

- ``n_iter`` passes of ``batch_size`` images; image ``k`` of the request uses seed ``seed + k`` (and subseed
  ``subseed + k``), so any image can be made again alone.
- variation seeds: the initial noise is the spherical interpolation (Shoemake 1985) from the seed's noise towards
  the subseed's by ``subseed_strength``, written in the infotext as "Variation seed" and its strength.
- hires. fix: a second img2img pass at ``hr_scale`` times the size (or ``hr_resize_x`` x ``hr_resize_y``) with
  ``denoising_strength`` and ``hr_second_pass_steps`` steps; "Latent" upscalers resize the first pass's latents,
  the others (Lanczos, Nearest) its decoded images. The infotext keeps the first pass's size, as A1111's does.
- inpainting: ``inpainting_fill`` 1 starts from the image; 0 fills the masked area with the colour around it,
  2 with noise and 3 with grey before the image is encoded (A1111 fills latents for 2 and 3; filling pixels gives
  the same starting point without a second encoder path).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sdlite import __version__, schedulers
from sdlite.errors import InputError
from sdlite.images import INFOTEXT_KEY, png_base64, save_png
from sdlite.infotext import format_infotext, parse_infotext
from sdlite.request import DEFAULT_STEPS, MAX_SEED, chosen_seed
from sdlite.rng import NoiseGenerator
from sdlite.server.catalog import Catalog, ModelEntry
from sdlite.server.host import ModelHost
from sdlite.server.jobs import Progress
from sdlite.server.schemas import Img2ImgBody, Txt2ImgBody

# A1111's upscalers sdlite has: resampling filters for decoded images, interpolation modes for latents.
IMAGE_UPSCALERS = {
    "None": Image.Resampling.LANCZOS,
    "Lanczos": Image.Resampling.LANCZOS,
    "Nearest": Image.Resampling.NEAREST,
}
LATENT_UPSCALERS = {
    "Latent": Image.Resampling.BILINEAR,
    "Latent (antialiased)": Image.Resampling.BILINEAR,
    "Latent (bicubic)": Image.Resampling.BICUBIC,
    "Latent (bicubic antialiased)": Image.Resampling.BICUBIC,
    "Latent (nearest)": Image.Resampling.NEAREST,
    "Latent (nearest-exact)": Image.Resampling.NEAREST,
}
# A1111's randn_source setting -> sdlite's noise source ("GPU" noise is what the NV source reproduces on a CPU).
RANDN_SOURCES = {"CPU": "cpu", "GPU": "nv", "NV": "nv"}
RESIZE_MODES = {0: "fit", 1: "crop", 2: "pad", 3: "fit"}
HIRES_DEFAULT_STRENGTH = 0.7


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server."""

    max_side: int = 2048
    max_images: int = 16
    max_image_pixels: int = 4096 * 4096


@dataclass(frozen=True)
class Hires:
    """The second pass of A1111's hires. fix."""

    width: int
    height: int
    upscaler: str
    steps: int
    strength: float
    sampler: str | None
    schedule: str | None
    prompt: str
    negative_prompt: str
    fields: dict[str, object]


@dataclass
class Spec:
    """A checked generation: everything :func:`run` needs, nothing that still needs parsing."""

    mode: str
    prompt: str
    options: dict[str, Any]
    n_iter: int
    model: ModelEntry | None = None
    restore_model: bool = True
    refiner: ModelEntry | None = None
    subseed: int = 0
    subseed_strength: float = 0.0
    hires: Hires | None = None
    image: Image.Image | None = None
    mask: Image.Image | None = None
    strength: float = 0.75
    resize: str = "fit"
    inpaint: dict[str, Any] = field(default_factory=dict)
    send_images: bool = True
    save_images: bool = False
    include_init_images: bool = False


@dataclass
class Outcome:
    """The images a job made, with what the response reports about them."""

    images: list[Image.Image]
    seeds: list[int]
    subseeds: list[int]
    model: ModelEntry
    width: int
    height: int


class ImageTooLarge(InputError):
    """An uploaded image beyond the server's pixel limit (HTTP 413)."""


def decode_image(name: str, text: Any, limits: Limits) -> Image.Image:
    """A base64 image field (with or without a ``data:`` URL prefix) -> an RGB or L image; InputError naming the
    field when it is not an image, ImageTooLarge beyond ``limits.max_image_pixels``."""
    if not isinstance(text, str) or not text:
        raise InputError(f"{name}: expected a base64-encoded image")
    payload = text.split(",", 1)[1] if text.startswith("data:") else text
    try:
        raw = base64.b64decode(payload, validate=False)
        image = Image.open(io.BytesIO(raw))
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError):
        raise InputError(f"{name}: not a base64-encoded PNG, JPEG or WebP image") from None
    except Image.DecompressionBombError:  # PIL's own limit, far above the server's
        raise ImageTooLarge(f"{name}: more than {limits.max_image_pixels} pixels") from None
    if image.width * image.height > limits.max_image_pixels:
        raise ImageTooLarge(
            f"{name}: {image.width}x{image.height} pixels; this server takes at most {limits.max_image_pixels} pixels"
        )
    try:
        image.load()
    except (OSError, ValueError):
        raise InputError(f"{name}: the image data is truncated or corrupt") from None
    return image


def _seed(value: int | None, name: str) -> int:
    seed = chosen_seed(value)
    if seed > MAX_SEED:
        raise InputError(f"{name} {value}: must be at most {MAX_SEED}, or -1 for a random one")
    return int(seed)


def _setting(body: Txt2ImgBody, settings: dict[str, Any], key: str) -> Any:
    """A setting as the request overrides it (``override_settings``), else the server's."""
    return (body.override_settings or {}).get(key, settings.get(key))


def _count(name: str, value: int | None, default: int, low: int, high: int) -> int:
    value = default if value is None else value
    if not low <= value <= high:
        raise InputError(f"{name} {value}: must be from {low} to {high}")
    return value


def _side(name: str, value: int | None, limits: Limits) -> int | None:
    if value is None or value == 0:
        return None
    if not 8 <= value <= limits.max_side:
        raise InputError(f"{name} {value}: must be from 8 to {limits.max_side} on this server")
    return value


def _sampler(name: str | None, schedule: str | None, field_name: str) -> tuple[str | None, str | None]:
    if name is None:
        return None, schedule
    try:
        schedulers.infotext_fields(name, schedule)
    except ValueError as exc:
        raise InputError(f"{field_name} {name!r}: {exc}") from None
    return name, schedule


def make_spec(
    body: Txt2ImgBody, settings: dict[str, Any], catalog: Catalog, current: ModelEntry, limits: Limits
) -> Spec:
    """Check a txt2img or img2img body against the server's ``settings`` and ``limits``, for the model it names
    (``override_settings``) or the ``current`` one; InputError naming the field."""
    batch = _count("batch_size", body.batch_size, 1, 1, limits.max_images)
    n_iter = _count("n_iter", body.n_iter, 1, 1, limits.max_images)
    if batch * n_iter > limits.max_images:
        raise InputError(f"batch_size x n_iter = {batch * n_iter}: this server makes at most {limits.max_images}")
    model_name = (body.override_settings or {}).get("sd_model_checkpoint")
    model = catalog.find(model_name) if model_name else None
    width, height = _side("width", body.width, limits), _side("height", body.height, limits)
    if not isinstance(body, Img2ImgBody):  # img2img keeps the image's size when none is given
        width, height = width or (model or current).default_size[0], height or (model or current).default_size[1]
    defaults = (model or current).defaults
    sampler, schedule = _sampler(body.sampler_name or body.sampler_index, body.scheduler, "sampler_name")
    clip_skip = _setting(body, settings, "CLIP_stop_at_last_layers")
    if body.clip_skip is not None and "CLIP_stop_at_last_layers" not in (body.override_settings or {}):
        clip_skip = body.clip_skip
    source = _setting(body, settings, "randn_source")
    if source not in RANDN_SOURCES:
        raise InputError(f"randn_source {source!r}: expected one of {', '.join(RANDN_SOURCES)}")
    options = {
        "negative_prompt": body.negative_prompt or "",
        # A body without them (OpenAI's) gets the model's own (a few-step model's), else A1111's.
        "steps": defaults.get("steps", DEFAULT_STEPS) if body.steps is None else body.steps,
        "cfg_scale": defaults.get("cfg_scale", 7.0) if body.cfg_scale is None else body.cfg_scale,
        "sampler": sampler,
        "schedule": schedule,
        "seed": _seed(body.seed, "seed"),
        "width": width,
        "height": height,
        "batch": batch,
        "seed_source": RANDN_SOURCES[source],
        "clip_skip": clip_skip,
    }
    refiner = None
    # A1111's clients send "None" (or nothing) when no refiner is chosen.
    if body.refiner_checkpoint and body.refiner_checkpoint.strip() not in ("", "None"):
        refiner = catalog.find(body.refiner_checkpoint, "refiner_checkpoint")
        if body.refiner_switch_at is not None:  # else the pipeline's default, A1111's
            options["refiner_switch"] = body.refiner_switch_at
    spec = Spec(
        mode="txt2img",
        prompt=body.prompt or "",
        options=options,
        n_iter=n_iter,
        model=model,
        refiner=refiner,
        restore_model=body.override_settings_restore_afterwards is not False,
        send_images=body.send_images is not False,
        save_images=bool(body.save_images),
    )
    strength = body.subseed_strength or 0.0
    if strength and not isinstance(body, Img2ImgBody):  # img2img's noise comes from its image, not a seed's
        if not 0.0 <= strength <= 1.0:
            raise InputError(f"subseed_strength {strength}: must be from 0 to 1")
        spec.subseed, spec.subseed_strength = _seed(body.subseed, "subseed"), float(strength)
    if body.enable_hr and not isinstance(body, Img2ImgBody):
        spec.hires = _hires(body, sampler, schedule, width, height, limits)
    return spec


def _hires(
    body: Txt2ImgBody, sampler: str | None, schedule: str | None, width: int, height: int, limits: Limits
) -> Hires:
    upscaler = body.hr_upscaler or "Latent"
    if upscaler not in IMAGE_UPSCALERS and upscaler not in LATENT_UPSCALERS:
        known = ", ".join([*LATENT_UPSCALERS, *IMAGE_UPSCALERS])
        raise InputError(f"hr_upscaler {upscaler!r}: unknown; known: {known}")
    scale = 2.0 if body.hr_scale is None else body.hr_scale
    if body.hr_resize_x or body.hr_resize_y:
        # A1111 fills a missing side from the other one, keeping the first pass's aspect ratio.
        target_w = body.hr_resize_x or round(body.hr_resize_y * width / height)
        target_h = body.hr_resize_y or round(body.hr_resize_x * height / width)
        fields: dict[str, object] = {"Hires resize": f"{target_w}x{target_h}"}
    else:
        if not 1.0 <= scale <= 8.0:
            raise InputError(f"hr_scale {scale}: must be from 1 to 8")
        target_w, target_h = int(width * scale), int(height * scale)
        fields = {"Hires upscale": scale}
    target_w, target_h = target_w // 8 * 8, target_h // 8 * 8
    for name, side in (("hires width", target_w), ("hires height", target_h)):
        _side(name, side, limits)
    steps = _count("hr_second_pass_steps", body.hr_second_pass_steps, 0, 0, 1000)
    strength = HIRES_DEFAULT_STRENGTH if body.denoising_strength is None else body.denoising_strength
    hr_sampler, hr_schedule = _sampler(body.hr_sampler_name, body.hr_scheduler, "hr_sampler_name")
    if steps:
        fields["Hires steps"] = steps
    fields["Hires upscaler"] = upscaler
    return Hires(
        target_w,
        target_h,
        upscaler,
        steps,
        strength,
        hr_sampler or sampler,
        hr_schedule or schedule,
        body.hr_prompt or body.prompt or "",
        body.hr_negative_prompt or body.negative_prompt or "",
        fields,
    )


def make_img2img_spec(
    body: Img2ImgBody, settings: dict[str, Any], catalog: Catalog, current: ModelEntry, limits: Limits
) -> Spec:
    """:func:`make_spec` for img2img and inpainting: the init image and mask decoded and checked too."""
    spec = make_spec(body, settings, catalog, current, limits)
    if not body.init_images:
        raise InputError("init_images: expected at least one base64-encoded image")
    spec.mode = "img2img"
    spec.image = decode_image("init_images[0]", body.init_images[0], limits).convert("RGB")
    spec.strength = 0.75 if body.denoising_strength is None else body.denoising_strength
    resize_mode = 0 if body.resize_mode is None else body.resize_mode
    if resize_mode not in RESIZE_MODES:
        raise InputError(f"resize_mode {resize_mode}: expected 0 (resize), 1 (crop), 2 (fill) or 3 (latent)")
    spec.resize = RESIZE_MODES[resize_mode]
    spec.include_init_images = bool(body.include_init_images)
    if body.mask:
        mask = decode_image("mask", body.mask, limits).convert("L")
        if body.inpainting_mask_invert:
            mask = ImageOps.invert(mask)
        fill = 1 if body.inpainting_fill is None else body.inpainting_fill
        if fill not in (0, 1, 2, 3):
            raise InputError(
                f"inpainting_fill {fill}: expected 0 (fill), 1 (original), 2 (latent noise) or 3 (nothing)"
            )
        blur = body.mask_blur if body.mask_blur is not None else 4
        blur = max(blur, body.mask_blur_x or 0, body.mask_blur_y or 0)
        spec.mask = mask
        spec.inpaint = {
            "mask_blur": _count("mask_blur", blur, 4, 0, 256),
            "only_masked": bool(body.inpaint_full_res),
            "padding": _count("inpaint_full_res_padding", body.inpaint_full_res_padding, 32, 0, 1024),
            "fill": fill,
        }
    return spec


def _filled(image: Image.Image, mask: Image.Image, fill: int, seed: int) -> Image.Image:
    """The image with the masked area pre-filled as ``inpainting_fill`` asks (1: left as it is)."""
    if fill == 1:
        return image
    pixels = np.asarray(image, np.float32)
    masked = np.asarray(mask.resize(image.size), np.float32)[..., None] >= 128
    if fill == 0:
        kept = pixels[~masked[..., 0]]
        value = kept.mean(axis=0) if len(kept) else np.full(3, 127.5, np.float32)
    elif fill == 2:
        value = np.random.default_rng(seed).uniform(0, 255, pixels.shape).astype(np.float32)
    else:
        value = np.full(3, 127.5, np.float32)
    return Image.fromarray(np.where(masked, value, pixels).round().astype(np.uint8))


def _slerp(t: float, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Spherical interpolation from ``low`` to ``high`` (Shoemake 1985); linear when they are nearly parallel."""
    cos = float(np.sum(low * high) / (np.linalg.norm(low) * np.linalg.norm(high)))
    if abs(cos) > 0.9995:
        return (1 - t) * low + t * high
    omega = np.arccos(cos)
    return (np.sin((1 - t) * omega) * low + np.sin(t * omega) * high) / np.sin(omega)


def _variation_noise(spec: Spec, pipe, seed: int, subseed: int) -> np.ndarray:
    """The initial noise of a batch whose image i has seed ``seed + i`` and variation seed ``subseed + i``."""
    width, height, factor = spec.options["width"], spec.options["height"], pipe.vae.factor
    shape = (1, pipe.vae.channels, height // factor, width // factor)
    source = spec.options["seed_source"]
    noises = []
    for i in range(spec.options["batch"]):
        base = NoiseGenerator(seed + i, source).randn(shape)
        other = NoiseGenerator(subseed + i, source).randn(shape)
        noises.append(_slerp(spec.subseed_strength, base, other))
    return np.concatenate(noises).astype(np.float32)


def amend_infotext(image: Image.Image, changes: dict[str, object]) -> None:
    """Set infotext fields of ``image`` (a value of None removes the field)."""
    prompt, negative, fields = parse_infotext(image.info.get(INFOTEXT_KEY, ""))
    image.info[INFOTEXT_KEY] = format_infotext(prompt, negative, {**fields, **changes})


def _upscale_latents(latents: np.ndarray, width: int, height: int, upscaler: str, factor: int) -> np.ndarray:
    size = (width // factor, height // factor)
    mode = LATENT_UPSCALERS[upscaler]
    return np.stack(
        [
            np.stack([np.asarray(Image.fromarray(channel, mode="F").resize(size, mode)) for channel in sample])
            for sample in latents.astype(np.float32)
        ]
    )


def _first_pass(spec: Spec, pipe, options: dict[str, Any], callback, latent: bool) -> Any:
    if spec.mode == "txt2img":
        output = "latent" if latent else "pil"
        return pipe.txt2img(spec.prompt, **options, output_type=output, progress=False, callback=callback)
    if spec.mask is None:
        return pipe.img2img(
            spec.prompt, spec.image, spec.strength, spec.resize, progress=False, callback=callback, **options
        )
    inpaint = dict(spec.inpaint)
    image = _filled(spec.image, spec.mask, inpaint.pop("fill"), options["seed"])
    return pipe.inpaint(
        spec.prompt, image, spec.mask, spec.strength, resize=spec.resize, progress=False, callback=callback,
        **inpaint, **options,
    )  # fmt: skip


def _hires_pass(spec: Spec, pipe, options: dict[str, Any], first: Any, callback) -> list[Image.Image]:
    hires = spec.hires
    second = {
        **options,
        "negative_prompt": hires.negative_prompt,
        "steps": hires.steps or options["steps"],
        "sampler": hires.sampler,
        "schedule": hires.schedule,
        "width": hires.width,
        "height": hires.height,
    }
    second.pop("latents", None)  # the first pass's variation noise
    if hires.upscaler in LATENT_UPSCALERS:
        latents = _upscale_latents(first, hires.width, hires.height, hires.upscaler, pipe.vae.factor)
        del second["width"], second["height"]
        return list(
            pipe.img2img(
                hires.prompt, None, hires.strength, progress=False, callback=callback, image_latents=latents, **second
            )
        )
    images = []
    for i, image in enumerate(first):
        upscaled = image.resize((hires.width, hires.height), IMAGE_UPSCALERS[hires.upscaler])
        one = {**second, "seed": options["seed"] + i, "batch": 1}
        images += pipe.img2img(hires.prompt, upscaled, hires.strength, progress=False, callback=callback, **one)
    return images


def run(spec: Spec, host: ModelHost, progress: Progress, outdir: Path | None) -> Outcome:
    """Make the images of ``spec`` on the host's model (in the worker thread); see the module's description."""
    previous = host.entry
    if spec.model is not None:
        host.switch(spec.model)
    try:
        pipe = host.pipeline()
        pipe.use_refiner(spec.refiner.path if spec.refiner is not None else None)
        per_iteration = 2 if spec.hires else 1
        progress.job_count = spec.n_iter * per_iteration
        batch = spec.options["batch"]
        width, height = spec.options["width"], spec.options["height"]
        images: list[Image.Image] = []
        seeds: list[int] = []
        for it in range(spec.n_iter):
            if progress.interrupted:
                break
            seed = spec.options["seed"] + it * batch
            subseed = spec.subseed + it * batch
            options = {**spec.options, "seed": seed}
            progress.begin_pass(it * per_iteration, spec.options["steps"])
            callback = progress.callback(pipe.preview)
            if spec.subseed_strength:
                options["latents"] = _variation_noise(spec, pipe, seed, subseed)
            latent = spec.hires is not None and spec.hires.upscaler in LATENT_UPSCALERS
            result = _first_pass(spec, pipe, options, callback, latent)
            if spec.hires is not None:
                # After an interrupt the second pass stops at its first step: the images still come out of it,
                # decoded and with their infotext.
                progress.begin_pass(it * per_iteration + 1, spec.hires.steps or spec.options["steps"])
                result = _hires_pass(spec, pipe, options, result, progress.callback(pipe.preview))
                for image in result:
                    amend_infotext(image, {"Size": f"{width}x{height}", **spec.hires.fields})
            result = list(result)
            if spec.subseed_strength:
                for i, image in enumerate(result):
                    amend_infotext(
                        image, {"Variation seed": subseed + i, "Variation seed strength": spec.subseed_strength}
                    )
            images += result
            seeds += [seed + i for i in range(len(result))]
        if spec.save_images and outdir is not None:
            _save(images, seeds, outdir / f"{spec.mode}-images")
        final = images[0].size if images else (width or 0, height or 0)
        subseeds = [spec.subseed + k for k in range(len(seeds))] if spec.subseed_strength else list(seeds)
        return Outcome(images, seeds, subseeds, host.entry, final[0], final[1])
    finally:
        if spec.model is not None and spec.restore_model:
            host.switch(previous)


def _save(images: list[Image.Image], seeds: list[int], folder: Path) -> None:
    day = folder / datetime.now().strftime("%Y-%m-%d")
    day.mkdir(parents=True, exist_ok=True)
    start = len(list(day.glob("*.png")))
    for k, (image, seed) in enumerate(zip(images, seeds, strict=True)):
        save_png(image, day / f"{start + k:05d}-{seed}.png")


def response(spec: Spec, body: Txt2ImgBody, outcome: Outcome) -> dict[str, Any]:
    """The A1111 response: base64 PNGs, the request's parameters, and ``info`` (a JSON string, as A1111's)."""
    infotexts = [image.info.get(INFOTEXT_KEY, "") for image in outcome.images]
    n = len(outcome.images)
    options = spec.options
    info = {
        "prompt": spec.prompt,
        "all_prompts": [spec.prompt] * n,
        "negative_prompt": options["negative_prompt"],
        "all_negative_prompts": [options["negative_prompt"]] * n,
        "seed": options["seed"],
        "all_seeds": outcome.seeds,
        "subseed": outcome.subseeds[0] if outcome.subseeds else options["seed"],
        "all_subseeds": outcome.subseeds,
        "subseed_strength": spec.subseed_strength,
        "width": outcome.width,
        "height": outcome.height,
        "sampler_name": _infotext_field(infotexts, "Sampler"),
        "scheduler": _infotext_field(infotexts, "Schedule type"),
        "cfg_scale": options["cfg_scale"],
        "steps": options["steps"],
        "batch_size": options["batch"],
        "restore_faces": False,
        "sd_model_name": outcome.model.name,
        "sd_model_hash": outcome.model.hash,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": spec.strength if spec.mode == "img2img" else (spec.hires.strength if spec.hires else 0),
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": datetime.now().strftime("%Y%m%d%H%M%S"),
        "clip_skip": options["clip_skip"],
        "is_using_inpainting_conditioning": False,
        "version": f"sdlite {__version__}",
    }
    images = [png_base64(image) for image in outcome.images] if spec.send_images else []
    if spec.include_init_images and spec.image is not None:
        images.append(png_base64(spec.image))
    return {"images": images, "parameters": _parameters(body), "info": json.dumps(info)}


def _infotext_field(infotexts: list[str], key: str) -> str | None:
    return parse_infotext(infotexts[0])[2].get(key) if infotexts else None


def _parameters(body: Txt2ImgBody) -> dict[str, Any]:
    # The request as understood, without the (large) images, which A1111 also leaves out.
    params = body.model_dump()
    for key in ("init_images", "mask"):
        if params.get(key):
            params[key] = None
    return params
