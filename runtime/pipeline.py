"""The torch-free Stable Diffusion pipeline: text encoder, denoising loop, VAE decoder, in numpy.

The loop follows diffusers' ``StableDiffusionPipeline`` step for step (classifier-free guidance as one
batch of [unconditional, conditional], Ho & Salimans 2022, eq. 6), so that the same weights and the
same initial latents give the same image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sdlite import schedulers
from sdlite.conditioning import TextConditioner
from sdlite.denoiser import Denoiser, StepCallback, denoise, handoff_entry, schedule_start
from sdlite.embeddings import ti_hashes
from sdlite.engines import ENGINE_FORMATS, check_engine
from sdlite.errors import InputError, check_finite
from sdlite.family import make_family, text_conditioners
from sdlite.finishing import Finisher, ModelFacts, SafetyChecker
from sdlite.hashing import short_hash
from sdlite.images import resize_to, to_pil, to_pixels, to_unit, working_size
from sdlite.layout import SAFETY_CHECKER, SDXL_FAMILIES, TINY_VAE_DECODER, TINY_VAE_PARTS
from sdlite.loras import LoraLibrary, LoraSet
from sdlite.masks import check_extend, check_not_empty, masked_region, outpaint_canvas, paste_back, prepare_mask
from sdlite.memory_guard import MemoryGuard, UNetShape
from sdlite.model_folder import ModelFolder
from sdlite.parts import PartPool
from sdlite.request import GenerationRequest, check_size, check_strength, is_finite_number, make_request
from sdlite.rng import DEFAULT_SOURCE, NoiseGenerator
from sdlite.safety import load_preprocessing
from sdlite.vae import VAE_CHOICES, LatentCodec, TinyVae, Vae

__all__ = ["GenerationRequest", "Pipeline", "check_size", "check_strength"]

# A1111's default "Refiner switch at": the refiner takes the last fifth of the denoising.
DEFAULT_REFINER_SWITCH = 0.8
# In low-memory mode the VAE tiles once its estimated working set passes this (auto tiling).
LOW_MEMORY_VAE_BUDGET = 1 << 30

# diffusers' scheduler classes -> the A1111 sampler name sdlite uses when the user names none.
_DEFAULT_SAMPLERS = {
    "PNDMScheduler": "PNDM",
    "DDIMScheduler": "DDIM",
    "DDPMScheduler": "DDPM",
    "EulerDiscreteScheduler": "Euler",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "HeunDiscreteScheduler": "Heun",
    "LMSDiscreteScheduler": "LMS",
    "KDPM2DiscreteScheduler": "DPM2",
    "KDPM2AncestralDiscreteScheduler": "DPM2 a",
    "DPMSolverMultistepScheduler": "DPM++ 2M",
    "DPMSolverSDEScheduler": "DPM++ SDE",
    "UniPCMultistepScheduler": "UniPC",
    "DEISMultistepScheduler": "DEIS",
    "LCMScheduler": "LCM",
    "TCDScheduler": "TCD",
}


@dataclass(frozen=True)
class Init:
    """What a mode starts the loop from: noise (txt2img), or an image (N=1, 3, H, W in -1..1) noised to
    ``strength``, optionally with a binary repaint mask (1, 1, H, W), or an image's latents (N, C, h, w) already
    encoded (a second pass at a larger size, as A1111's latent hires. fix) noised to ``strength``."""

    latents: np.ndarray | None = None
    pixels: np.ndarray | None = None
    strength: float = 1.0
    mask: np.ndarray | None = None
    image_latents: np.ndarray | None = None

    @property
    def from_image(self) -> bool:
        """Whether the loop starts from an image (img2img, inpainting) rather than from noise."""
        return self.pixels is not None or self.image_latents is not None


def _as_image(image: Image.Image | str | Path) -> Image.Image:
    from sdlite.images import load_image

    return image if isinstance(image, Image.Image) else load_image(image)


def _size_or(size: tuple[int | None, int | None], default: tuple[int, int]) -> dict[str, int]:
    """{"width", "height"} from the caller's size where given, else from ``default``."""
    return {"width": size[0] or default[0], "height": size[1] or default[1]}


def _checked_latents(latents: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    latents = np.asarray(latents, dtype=np.float32)
    if latents.shape != shape:
        raise InputError(f"latents of shape {latents.shape}: expected {shape}")
    return latents


class Pipeline:
    """Text-to-image generation on a converted-model folder.

    When the folder holds the checkpoint's safety checker, it runs on every finished image unless
    ``safety_checker=False``: flagged images come back black, and the result's ``nsfw_content_detected``
    holds one flag per image (``sdlite.results``).

    Memory: ``memory_budget`` (GiB) bounds what the loaded parts hold; a part stays loaded between uses
    while the parts fit, so repeated generations pay only their compute, and idle parts are released
    (smallest first) when one that is needed would not fit (``sdlite.parts``). ``low_memory`` is a budget of 0:
    each part (text encoder, U-Net, VAE) is loaded just before it runs and released afterwards, so the peak is
    the largest part rather than their sum. ``embeddings`` is a folder of textual-inversion embeddings that
    prompts can name (``sdlite.embeddings``).

    ``vae="taesd"`` decodes (and encodes) with the tiny autoencoder converted beside the VAE (``sdlite convert
    --tiny-vae``); when the folder has one, progress previews (:meth:`preview`) use it whatever ``vae`` is.
    """

    def __init__(
        self,
        folder: ModelFolder,
        engine: str = "onnx",
        device: str = "CPU",
        precision: str | None = None,
        low_memory: bool = False,
        threads: int | None = None,
        compute: str = "auto",
        vae_tiling: str = "auto",
        safety_checker: bool = True,
        embeddings: str | Path | None = None,
        memory_budget: float | None = None,
        vae: str = "full",
        lora_dir: str | Path | None = None,
        refiner: str | Path | None = None,
    ):
        check_engine(engine)
        if vae not in VAE_CHOICES:
            raise InputError(f"vae {vae!r}: unknown; known: {', '.join(VAE_CHOICES)}")
        has_tiny_vae = bool(folder.variants(TINY_VAE_DECODER))
        if vae == "taesd" and not has_tiny_vae:
            raise InputError(
                f"vae taesd: {folder.path} has no tiny VAE; convert the model with --tiny-vae (e.g. madebyollin/taesd)"
            )
        if memory_budget is not None and not (is_finite_number(memory_budget) and memory_budget >= 0):
            raise InputError(f"memory_budget {memory_budget!r}: must be a number of GiB, 0 or more")
        self.folder = folder
        self.engine_name = engine
        self.device = device
        self.precision = precision
        self.compute = compute
        self.low_memory = low_memory or memory_budget == 0
        self.threads = threads
        formats = ENGINE_FORMATS[engine]
        unet = folder.variant("unet", formats, precision)
        # ToMe, when the U-Net was converted with it, changes the image: the infotext says so (as A1111's).
        self.token_merging = unet.token_merging
        # The checkpoint's safety checker runs by default when the folder has one (fp32 only, in the format
        # the engine prefers); safety_checker=False never loads it.
        self.safety_checker = safety_checker and bool(folder.variants(SAFETY_CHECKER))

        def graph(name: str) -> Path:
            if name == SAFETY_CHECKER:
                return folder.graph(name, formats)
            if name in TINY_VAE_PARTS:
                return folder.graph(name, formats, folder.tiny_vae_precision(name, formats, precision))
            return folder.graph(name, formats, precision)

        conditioners = text_conditioners(folder, graph, embeddings)
        # The (first) text encoder's tokenizer and textual-inversion embeddings (None without an embeddings folder).
        self.tokenizer = conditioners[0][1].tokenizer
        self.embeddings = conditioners[0][1].embeddings
        encoders = [name for name, _ in conditioners]
        edits = {name: c.graph_edit for name, c in conditioners if c.graph_edit is not None}
        budget = 0 if self.low_memory else None if memory_budget is None else int(memory_budget * (1 << 30))
        # SDXL's VAE overflows in fp16 (its config's force_upcast): on a device that computes in f16, it gets f32.
        overflows = [
            part
            for part in ("vae_encoder", "vae_decoder")
            if folder.family in SDXL_FAMILIES and folder.part_config(part).get("force_upcast", False)
        ]
        self.parts = PartPool(
            graph,
            engine,
            device,
            threads,
            compute,
            budget_bytes=budget,
            edits=edits or None,
            f32_parts=overflows if self.compute_precision == "f16" else (),
        )
        self.loras = LoraSet(
            LoraLibrary(lora_dir) if lora_dir is not None else None,
            lambda part, edit: self.parts.set_edit(part, "lora", edit),
            (*encoders, "unet"),
        )
        self.parts.observers.append(self.loras)
        self.family = make_family(folder, conditioners, self.parts.get, self.parts.done)
        tiny = None
        if has_tiny_vae:
            tiny_config = folder.part_config(TINY_VAE_DECODER)
            tiny = TinyVae(self.parts.get, float(tiny_config.get("scaling_factor", 1.0)), factor=folder.latent_factor)
        self.vae: LatentCodec = (
            tiny
            if vae == "taesd"
            else Vae(
                self.parts.get,
                folder.manifest.vae_scaling_factor,
                tiling=vae_tiling,
                budget_bytes=LOW_MEMORY_VAE_BUDGET if self.low_memory else None,
                factor=folder.latent_factor,
            )
        )
        # Previews decode with the tiny VAE when there is one: a fraction of a U-Net step instead of several.
        self.preview_codec: LatentCodec = tiny or self.vae
        # The parts every generation runs; resolve every graph now, so a missing part or precision fails first.
        self.generation_parts = (*encoders, "unet", self.vae.decoder_part)
        resident = [*self.generation_parts, *([SAFETY_CHECKER] if self.safety_checker else [])]
        for name in resident:
            self.parts.path(name)
        safety = None
        if self.safety_checker:
            safety = SafetyChecker(
                lambda: self.parts.get(SAFETY_CHECKER),
                lambda: self.parts.done(SAFETY_CHECKER),
                load_preprocessing(folder.path),
            )
        facts = ModelFacts(
            name=folder.manifest.name,
            model_hash=folder.model_hash,
            lora_hashes=folder.manifest.lora_hashes(),
            token_merging=self.token_merging,
            engine=engine,
            compute=self.compute_precision,
            vae=(folder.manifest.tiny_vae or "taesd") if vae == "taesd" else None,
        )
        self.finisher = Finisher(facts, safety)
        decoder_config = folder.part_config(self.vae.decoder_part)
        decoder_widths = decoder_config.get("block_out_channels") or decoder_config.get("decoder_block_out_channels")
        decoder_widths = decoder_widths or [128]
        self.memory_guard = MemoryGuard(
            UNetShape.from_config(folder.part_config("unet"), unet.attention),
            self.vae.factor,
            int(decoder_widths[0]),
            engine,
            self.vae.decode_pixels,
        )
        if budget is None:
            for name in resident:
                self.parts.get(name)
                self.parts.done(name)
        self.refiner: Pipeline | None = None
        self.use_refiner(refiner)

    def use_refiner(self, path: str | Path | None) -> None:
        """Make the converted SDXL refiner folder at ``path`` finish this pipeline's generations, or none
        (``None``); a refiner already loaded from that folder stays loaded."""
        current = Path(self.refiner.folder.path).resolve() if self.refiner is not None else None
        if path is not None and current == Path(path).resolve():
            return
        refiner = self._load_refiner(path) if path is not None else None
        if self.refiner is not None:
            self.refiner.release()
        self.refiner = refiner

    def _load_refiner(self, path: str | Path) -> Pipeline:
        """The pipeline of the refiner folder at ``path``, loaded as this one (engine, device, precision, memory),
        which must work on this model's latents."""
        folder = ModelFolder.open(path)
        mine, theirs = self.folder, folder
        if (theirs.manifest.vae_scaling_factor, theirs.unet_in_channels) != (
            mine.manifest.vae_scaling_factor,
            self.vae.channels,
        ):
            raise InputError(
                f"refiner {folder.path}: a {theirs.family} model, whose latents are not this {mine.family} model's; "
                "use a refiner of the same family (an SDXL refiner for an SDXL model)"
            )
        return Pipeline(
            folder,
            engine=self.engine_name,
            device=self.device,
            precision=self.precision,
            low_memory=self.low_memory,
            threads=self.threads,
            compute=self.compute,
            safety_checker=False,
            memory_budget=None if self.parts.budget_bytes is None else self.parts.budget_bytes / (1 << 30),
        )

    @classmethod
    def load(
        cls,
        path: str | Path,
        engine: str = "onnx",
        device: str = "CPU",
        precision: str | None = None,
        low_memory: bool = False,
        threads: int | None = None,
        compute: str = "auto",
        vae_tiling: str = "auto",
        safety_checker: bool = True,
        embeddings: str | Path | None = None,
        memory_budget: float | None = None,
        vae: str = "full",
        lora_dir: str | Path | None = None,
        refiner: str | Path | None = None,
    ) -> Pipeline:
        """Open the converted-model folder at ``path`` and load its parts in ``engine`` on ``device``.

        ``compute`` is the arithmetic precision (f32, bf16, f16, or auto: the device's default);
        ``vae_tiling`` (auto, on, off) decodes and encodes big images in tiles to bound memory;
        ``embeddings`` is a folder of textual-inversion embeddings (``.safetensors``, AUTOMATIC1111 or
        diffusers layout) that prompts use by name, no conversion needed; ``memory_budget`` (GiB) bounds what
        the loaded parts hold (see :class:`Pipeline`); ``vae`` "taesd" decodes with the tiny VAE; ``lora_dir`` is a
        folder of LoRA files that prompts use as ``<lora:name:multiplier>`` (``sdlite.loras``), no conversion
        needed; ``refiner`` is a converted SDXL refiner folder that finishes every generation (see
        :meth:`txt2img`'s ``refiner_switch``)."""
        return cls(
            ModelFolder.open(path),
            engine=engine,
            device=device,
            precision=precision,
            low_memory=low_memory,
            threads=threads,
            compute=compute,
            vae_tiling=vae_tiling,
            safety_checker=safety_checker,
            embeddings=embeddings,
            memory_budget=memory_budget,
            vae=vae,
            lora_dir=lora_dir,
            refiner=refiner,
        )

    @property
    def default_sampler(self) -> str:
        """The sampler the manifest's defaults name (a few-step model's), else the one the model's own scheduler
        config names (SD 1.5: PNDM)."""
        sampler = self.folder.manifest.defaults.get("sampler")
        return sampler or _DEFAULT_SAMPLERS.get(self.folder.scheduler_config.get("_class_name", ""), "Euler a")

    @property
    def defaults(self) -> dict:
        """The generation defaults the model's manifest gives (a few-step family's steps, cfg_scale, sampler,
        schedule); what it leaves out is SD's usual (20 steps, CFG 7.5, the scheduler's sampler)."""
        return dict(self.folder.manifest.defaults)

    @property
    def default_size(self) -> tuple[int, int]:
        """The size the model was trained at."""
        return tuple(self.folder.manifest.default_size)

    @property
    def compute_precision(self) -> str:
        """The precision the arithmetic runs in (what ``compute="auto"`` resolves to on this device)."""
        if self.engine_name == "openvino":
            from sdlite.engines.openvino import compute_precision

            return compute_precision(self.device, self.compute)
        return "f32"

    @property
    def conditioner(self) -> TextConditioner:
        """The prompt encoder of the model's text encoder (chunks, emphasis, embeddings)."""
        return self.family.conditioner

    def encode_prompt(self, prompts: list[str], clip_skip: int = 1) -> np.ndarray:
        """Prompts in AUTOMATIC1111's syntax (emphasis, BREAK, any length) -> the U-Net's context,
        (len(prompts), 77 * chunks, width), every prompt padded to the same number of chunks. ``clip_skip``
        N > 1 takes the text encoder's N-th layer from the end (see ``sdlite.conditioning``)."""
        return self.family.encode(prompts, clip_skip)

    def _check(self, *args, **kwargs) -> GenerationRequest:
        """A checked request (``sdlite.request.make_request``) with this model's defaults; with a refiner, it
        takes over after 0.8 of the steps unless ``refiner_switch`` says otherwise (A1111's default)."""
        switch = kwargs.get("refiner_switch")
        if switch is not None and self.refiner is None:
            raise InputError(f"refiner_switch {switch}: no refiner is loaded (load the pipeline with refiner=FOLDER)")
        if switch is None and self.refiner is not None:
            kwargs["refiner_switch"] = DEFAULT_REFINER_SWITCH
        return make_request(
            *args,
            **kwargs,
            default_size=self.default_size,
            default_sampler=self.default_sampler,
            scheduler_config=self.folder.scheduler_config,
            embedded_guidance=self.family.embeds_guidance,
            model_defaults=self.folder.manifest.defaults,
        )

    def txt2img(
        self,
        prompt: str,
        negative_prompt: str = "",
        steps: int | None = None,
        cfg_scale: float | None = None,
        sampler: str | None = None,
        seed: int | None = None,
        width: int | None = None,
        height: int | None = None,
        batch: int = 1,
        seed_source: str = DEFAULT_SOURCE,
        schedule: str | None = None,
        clip_skip: int = 1,
        watermark: bool = False,
        cfg_rescale: float = 0.0,
        latents: np.ndarray | None = None,
        output_type: str = "pil",
        refiner_switch: float | None = None,
        progress: bool = True,
        callback: StepCallback | None = None,
    ) -> list[Image.Image] | np.ndarray:
        """Generate ``batch`` images for ``prompt``.

        Image ``i`` uses seed ``seed + i`` (as AUTOMATIC1111 does), so any image of a batch can be made again
        alone. ``steps``, ``cfg_scale``, ``sampler`` and ``schedule`` left None take the model's defaults
        (:attr:`defaults`: a few-step model's), else 20 steps at CFG 7.5 with the scheduler's own sampler.
        ``latents``, when given, replaces the initial noise (shape (batch, 4, height/8, width/8)).
        ``output_type="np"`` returns the decoded float images (batch, H, W, 3) in 0..1 instead of PIL images,
        ``output_type="latent"`` the final latents undecoded (for :meth:`img2img`'s ``image_latents``); PIL images
        carry their infotext in ``image.info["parameters"]``. ``callback(step, total, latents, denoised)`` runs
        after every model evaluation and may stop the loop (``sdlite.denoiser.StepCallback``). Prompts take
        AUTOMATIC1111's syntax (``(word:1.2)``, ``[word]``, ``BREAK``, any length);
        ``clip_skip`` 2 conditions on the text encoder's penultimate layer, as A1111's "Clip skip". ``watermark``
        hides the original Stable Diffusion scripts' invisible mark ("StableDiffusionV1") in the images, which
        invisible-watermark's ``dwtDct`` decoder reads back (``sdlite.watermark``; images of 256x256 pixels or more).
        ``cfg_rescale`` (0..1) rescales the guided prediction (Lin et al. 2024; A1111's "CFG Rescale"), for models
        trained with zero terminal SNR. A negative prompt at CFG 1 or below (or on a model that embeds the scale, such
        as LCM) is not used, and a :class:`sdlite.errors.SdliteWarning` says so. With a refiner loaded
        (``refiner=FOLDER``), it takes over once ``refiner_switch`` (default 0.8) of the noise is removed, as
        A1111's "Refiner switch at".
        """
        request = self._check(
            prompt,
            negative_prompt,
            steps,
            cfg_scale,
            sampler,
            seed,
            width,
            height,
            batch,
            seed_source,
            schedule,
            clip_skip,
            watermark,
            cfg_rescale,
            refiner_switch=refiner_switch,
        )
        self.finisher.check_request(request, (request.width, request.height))
        if output_type == "latent":
            return self._sample(request, Init(latents=latents), progress, callback)
        images = self._generate(request, Init(latents=latents), progress, callback)
        return self._finish(images, request, {}, output_type)

    def img2img(
        self,
        prompt: str,
        image: Image.Image | str | Path | None,
        strength: float = 0.75,
        resize: str = "fit",
        output_type: str = "pil",
        progress: bool = True,
        callback: StepCallback | None = None,
        image_latents: np.ndarray | None = None,
        **options,
    ) -> list[Image.Image] | np.ndarray:
        """Repaint ``image`` towards ``prompt`` (SDEdit, Meng et al. 2022): noise it to ``strength`` (0..1]
        of the schedule and denoise from there. Without ``width``/``height`` the image keeps its size,
        brought to multiples of 8 by ``resize`` (fit: stretch, crop: centre-crop, pad: extend the edges).
        ``image_latents`` (batch, C, h, w), given instead of ``image``, start from latents already encoded (such as
        :meth:`txt2img`'s ``output_type="latent"`` upscaled: A1111's latent hires. fix); the size is theirs.
        Other keyword arguments are txt2img's."""
        check_strength(strength)
        size = (options.pop("width", None), options.pop("height", None))
        if image_latents is not None:
            height, width = (side * self.vae.factor for side in image_latents.shape[-2:])
            request = self._check(prompt, **options, width=width, height=height)
            shape = (request.batch, self.vae.channels, *image_latents.shape[-2:])
            init = Init(image_latents=_checked_latents(image_latents, shape), strength=strength)
        else:
            image = _as_image(image)
            request = self._check(prompt, **options, **_size_or(size, working_size(image, resize)))
            pixels = to_pixels(resize_to(image, (request.width, request.height), resize))
            init = Init(pixels=pixels, strength=strength)
        self.finisher.check_request(request, (request.width, request.height))
        images = self._generate(request, init, progress, callback)
        return self._finish(images, request, {"Denoising strength": strength}, output_type)

    def inpaint(
        self,
        prompt: str,
        image: Image.Image | str | Path,
        mask: Image.Image | str | Path,
        strength: float = 1.0,
        mask_blur: int = 4,
        only_masked: bool = False,
        padding: int = 32,
        resize: str = "fit",
        output_type: str = "pil",
        progress: bool = True,
        callback: StepCallback | None = None,
        **options,
    ) -> list[Image.Image] | np.ndarray:
        """Repaint the white part of ``mask`` in ``image``.

        A model whose U-Net takes 9 channels (an inpainting model) is conditioned on the mask and the masked
        image; a regular model keeps the unmasked latents by blending them back in at every step (as
        diffusers and AUTOMATIC1111 do). The result is pasted over the original through the mask blurred by
        ``mask_blur`` pixels, so pixels outside the blurred mask are exactly the input's. ``only_masked``
        inpaints just the mask's bounding box grown by ``padding`` pixels, at the working size (``width`` x
        ``height``, default the model's), which gives small regions full resolution. Other keyword
        arguments are txt2img's."""
        image, mask = _as_image(image), _as_image(mask)
        check_strength(strength)
        soft = prepare_mask(mask, image.size, mask_blur)
        check_not_empty(soft)
        size = (options.pop("width", None), options.pop("height", None))
        extra: dict[str, object] = {"Denoising strength": strength, "Mask blur": mask_blur}
        original = to_unit(image)
        if only_masked:
            work = _size_or(size, self.default_size)
            request = self._check(prompt, **options, **work)
            self.finisher.check_request(request, image.size)
            region = masked_region(soft, padding, request.width / request.height)
            crop = image.crop((region.left, region.top, region.right, region.bottom))
            crop_mask = Image.fromarray((soft * 255).round().astype(np.uint8)).crop(
                (region.left, region.top, region.right, region.bottom)
            )
            generated = self._inpaint_pixels(request, crop, crop_mask, strength, "fit", progress, callback)
            # Back to the region's size, into a copy of the original, then through the soft mask.
            pieces = [np.asarray(p.resize(region.size, Image.LANCZOS), np.float32) / 255 for p in to_pil(generated)]
            full = np.repeat(original[None], len(pieces), axis=0)
            full[:, region.top : region.bottom, region.left : region.right] = np.stack(pieces)
            extra |= {"Inpaint area": "Only masked", "Masked area padding": padding}
            size_text = f"{image.width}x{image.height}"
        else:
            request = self._check(prompt, **options, **_size_or(size, working_size(image, resize)))
            target = (request.width, request.height)
            self.finisher.check_request(request, target)
            mask_image = Image.fromarray((soft * 255).round().astype(np.uint8))
            full = self._inpaint_pixels(request, image, mask_image, strength, resize, progress, callback)
            if target != image.size:
                original = to_unit(resize_to(image, target, resize))
                soft = np.asarray(resize_to(mask_image.convert("RGB"), target, resize), np.float32)[..., 0] / 255
            size_text = f"{request.width}x{request.height}"
        images = np.stack([paste_back(original, generated, soft) for generated in full]).astype(np.float32)
        return self._finish(images, request, extra, output_type, size_text)

    def outpaint(
        self,
        prompt: str,
        image: Image.Image | str | Path,
        extend: tuple[int, int, int, int] = (0, 0, 0, 0),
        mask_blur: int = 8,
        seam: int = 16,
        output_type: str = "pil",
        progress: bool = True,
        callback: StepCallback | None = None,
        **options,
    ) -> list[Image.Image] | np.ndarray:
        """Grow ``image`` by ``extend`` = (left, top, right, bottom) pixels (multiples of 8) and paint the new
        area, repainting a ``seam``-pixel band of the original along each grown side so the border blends;
        the rest of the original is kept exactly. Other keyword arguments are txt2img's."""
        image = _as_image(image)
        if image.width % 8 or image.height % 8:
            raise InputError(
                f"image is {image.width}x{image.height}: outpainting needs multiples of 8; resize it first "
                "(e.g. with sdlite img2img --resize crop --strength ...) or crop it"
            )
        for key in ("width", "height", "strength"):
            if options.pop(key, None) is not None:
                raise InputError(f"outpaint takes no {key}: the canvas size comes from the image and --extend")
        check_extend(extend)
        # The canvas is checked (size, memory) before it is allocated.
        canvas_size = (image.width + extend[0] + extend[2], image.height + extend[1] + extend[3])
        self._check_memory(self._check(prompt, **options, **_size_or(canvas_size, canvas_size)))
        canvas, mask = outpaint_canvas(image, tuple(extend), seam)
        result = self.inpaint(
            prompt,
            canvas,
            mask,
            strength=1.0,
            mask_blur=mask_blur,
            output_type=output_type,
            progress=progress,
            callback=callback,
            **options,
        )
        if output_type != "np":
            for item in result:
                item.info["parameters"] += f', Outpaint: "{",".join(map(str, extend))}"'
        return result

    def _inpaint_pixels(
        self,
        request: GenerationRequest,
        image: Image.Image,
        mask: Image.Image,
        strength: float,
        resize: str,
        progress: bool,
        callback: StepCallback | None,
    ) -> np.ndarray:
        """Inpaint at the request's size; returns decoded images (N, H, W, 3) before pasting back."""
        target = (request.width, request.height)
        pixels = to_pixels(resize_to(image, target, resize))
        soft = np.asarray(resize_to(mask.convert("RGB"), target, resize), np.float32)[..., 0] / 255
        # diffusers binarizes the mask at 0.5 for the U-Net; the soft mask is only used for pasting back.
        binary = (soft >= 0.5).astype(np.float32)[None, None]
        return self._generate(request, Init(pixels=pixels, strength=strength, mask=binary), progress, callback)

    def _generate(
        self,
        request: GenerationRequest,
        init: Init,
        progress: bool,
        callback: StepCallback | None,
    ) -> np.ndarray:
        """The denoising loop shared by every mode, then the decoder; returns images (N, H, W, 3) in 0..1."""
        images = self._decode(self._sample(request, init, progress, callback))
        check_finite(images, "the VAE decoder")
        return images

    def preview(self, latents: np.ndarray) -> list[Image.Image]:
        """Images of clean-latent estimates (N, C, h, w), such as a step callback's ``denoised``: what a
        progress preview shows; decoded by the tiny VAE when the folder has one."""
        return to_pil(np.nan_to_num(self._decode(np.asarray(latents, np.float32), self.preview_codec)))

    def _decode(self, latents: np.ndarray, codec: LatentCodec | None = None) -> np.ndarray:
        codec = codec or self.vae
        images = codec.decode(latents)
        self.parts.done(codec.decoder_part)
        return images

    def _encode(self, pixels: np.ndarray, draw) -> np.ndarray:
        """Latents of ``pixels``; a posterior sample draws its noise from ``draw`` (the image's stream)."""
        return self.vae.encode_latents(pixels, draw() if self.vae.samples_posterior else None)

    def _sample(
        self,
        request: GenerationRequest,
        init: Init,
        progress: bool,
        callback: StepCallback | None,
    ) -> np.ndarray:
        """The denoising loop shared by every mode; returns the final latents.

        Noise is drawn per image from that image's seed, in the order diffusers' pipelines draw it (VAE
        posterior sample, then the initial noise, then per-step noise), so runs can be compared with them."""
        strength = init.strength if init.from_image else 1.0
        if self.folder.family == "sdxl-refiner" and strength >= 1.0:
            raise InputError(
                f"{self.folder.path} is an SDXL refiner: it continues an image (img2img below strength 1, or as the "
                "refiner of an SDXL base model), it does not start one from noise"
            )
        self._check_memory(request)
        scheduler = schedulers.create(request.sampler, self.folder.scheduler_config, request.schedule)
        scheduler.set_timesteps(request.steps)
        start = schedule_start(scheduler, request.steps, strength)
        channels, factor = self.vae.channels, self.vae.factor
        shape = (1, channels, request.height // factor, request.width // factor)
        streams = [NoiseGenerator(request.seed + i, request.seed_source) for i in range(request.batch)]

        def draw() -> np.ndarray:
            return np.concatenate([stream.randn(shape) for stream in streams])

        self.loras.activate(request.prompt, request.negative_prompt)
        conditioning = self.family.conditioning(request)

        in_channels = self.folder.unet_in_channels
        conditioned = in_channels == 2 * channels + 1  # an inpainting U-Net: latents, mask, masked image
        image_latents = masked_latents = mask_latents = None
        if not init.from_image:
            noise = draw() if init.latents is None else _checked_latents(init.latents, (request.batch, *shape[1:]))
            latents = noise * np.float32(scheduler.init_noise_sigma)
        elif init.mask is None:
            image_latents = init.image_latents
            if image_latents is None:
                image_latents = self._encode(init.pixels, draw)
            noise = draw()
            latents = scheduler.noise_to(image_latents, noise, start)
        else:
            full_strength = init.strength == 1.0
            if not conditioned or not full_strength:
                image_latents = self._encode(init.pixels, draw)
            noise = draw()
            if full_strength:
                latents = noise * np.float32(scheduler.init_noise_sigma)
            else:
                latents = scheduler.noise_to(image_latents, noise, start)
            masked_noise = draw() if self.vae.samples_posterior else None
            if conditioned:
                masked_latents = self.vae.encode_latents(init.pixels * (init.mask < 0.5), masked_noise)
            # Nearest-neighbour downsampling to the latent grid, as torch's interpolate does by default.
            mask_latents = np.repeat(init.mask[:, :, ::factor, ::factor], request.batch, axis=0)
        if not conditioned and in_channels != channels:
            raise InputError(
                f"{self.folder.path}: U-Net takes {in_channels} input channels; "
                f"expected {channels} or {2 * channels + 1}"
            )
        if conditioned and mask_latents is None:
            raise InputError(f"{self.folder.path}: this is an inpainting model; use inpaint or outpaint")
        if init.pixels is not None:
            self.parts.done(self.vae.encoder_part)

        after_step = None
        if mask_latents is not None and not conditioned:

            def after_step(entry: int, latents: np.ndarray) -> np.ndarray:
                # Keep the unmasked area: the original latents, noised to the next evaluation's level.
                proper = image_latents
                if entry + 1 < len(scheduler.timesteps):
                    proper = scheduler.noise_to(image_latents, noise, entry + 1)
                return ((1 - mask_latents) * proper + mask_latents * latents).astype(np.float32)

        # An inpainting U-Net's extra channels (mask, masked-image latents) are the same at every step.
        channels = np.concatenate([mask_latents, masked_latents], axis=1) if conditioned else None
        cfg = request.cfg_scale if request.guided else 1.0
        handoff = None
        switch_at = handoff_entry(scheduler.timesteps, start, request.refiner_switch) if self.refiner else None
        if switch_at is not None:
            if conditioned:
                raise InputError("a refiner cannot continue an inpainting model's denoising; inpaint without it")
            refiner = self.refiner

            def to_refiner() -> Denoiser:
                self.parts.done("unet")
                if self.parts.budget_bytes is not None:
                    self.parts.release()  # the base's parts make room for the refiner's
                refined = refiner.family.conditioning(request)
                return Denoiser(refiner.parts.get("unet"), refined, cfg, None, request.cfg_rescale)

            handoff = (switch_at, to_refiner)
        # Made in the call, not kept in a local: after a handoff the base U-Net's engine must be free to go.
        latents = denoise(
            scheduler,
            start,
            latents,
            Denoiser(self.parts.get("unet"), conditioning, cfg, channels, request.cfg_rescale),
            draw,
            after_step,
            callback,
            progress,
            handoff,
        )
        self.parts.done("unet")
        if handoff is not None:
            self.refiner.parts.done("unet")
        return latents

    def _check_memory(self, request: GenerationRequest) -> None:
        """Refuse a request whose working set would not fit in the memory available (``sdlite.memory_guard``)."""
        # Parts load one at a time when they are not resident: the largest still to load is what the stages add.
        to_load = max(
            (self.parts.resident_bytes(part) for part in self.generation_parts if part not in self.parts.loaded()),
            default=0,
        )
        self.memory_guard.check(request.width, request.height, request.batch, request.guided, to_load)

    def _finish(
        self,
        images: np.ndarray,
        request: GenerationRequest,
        extra: dict[str, object],
        output_type: str,
        size: str | None = None,
    ) -> list[Image.Image] | np.ndarray:
        """The finishing step (``sdlite.finishing``) with the embeddings the request's prompts named."""
        embeddings = ti_hashes(self.family.embeddings_used(request))
        if self.refiner is not None and request.refiner_switch is not None:
            refiner = self.refiner.folder
            name = refiner.manifest.name + (f" [{short_hash(refiner.model_hash)}]" if refiner.model_hash else "")
            extra = {**extra, "Refiner": name, "Refiner switch at": request.refiner_switch}
        return self.finisher.finish(images, request, extra, output_type, embeddings, size, self.loras.hashes())

    def release(self) -> None:
        """Free every loaded part (the refiner's too)."""
        self.parts.release()
        if self.refiner is not None:
            self.refiner.release()
