"""The torch-free Stable Diffusion pipeline: text encoder, denoising loop, VAE decoder, in numpy.

The loop follows diffusers' ``StableDiffusionPipeline`` step for step (classifier-free guidance as one
batch of [unconditional, conditional], Ho & Salimans 2022, eq. 6), so that the same weights and the
same initial latents give the same image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from sdlite import __version__, schedulers
from sdlite.engines import ENGINE_FORMATS, Engine, check_engine, load_engine
from sdlite.errors import InputError
from sdlite.hashing import short_hash
from sdlite.infotext import format_infotext
from sdlite.model_folder import ModelFolder
from sdlite.rng import NoiseGenerator
from sdlite.tokenizer import CLIPTokenizer

LATENT_CHANNELS = 4
MAX_SEED = 2**64 - 1

# diffusers' scheduler classes -> the A1111 sampler name sdlite uses when the user names none.
_DEFAULT_SAMPLERS = {
    "PNDMScheduler": "PNDM",
    "DDIMScheduler": "DDIM",
    "EulerAncestralDiscreteScheduler": "Euler a",
    "DPMSolverMultistepScheduler": "DPM++ 2M Karras",
}


@dataclass(frozen=True)
class GenerationRequest:
    """Checked parameters of one txt2img call."""

    prompt: str
    negative_prompt: str
    steps: int
    cfg_scale: float
    sampler: str
    seed: int
    width: int
    height: int
    batch: int


def check_size(width: int, height: int) -> None:
    """Width and height must be positive multiples of 8 (the VAE's downsampling factor)."""
    if width < 8 or height < 8 or width % 8 or height % 8:
        raise InputError(f"size {width}x{height}: width and height must be positive multiples of 8")


class Pipeline:
    """Text-to-image generation on a converted-model folder.

    ``low_memory`` loads each part (text encoder, U-Net, VAE decoder) just before it runs and releases it
    afterwards, so peak memory is the largest part rather than their sum.
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
    ):
        check_engine(engine)
        self.folder = folder
        self.engine_name = engine
        self.device = device
        self.precision = precision
        self.compute = compute
        self.low_memory = low_memory
        self.threads = threads
        self.tokenizer = CLIPTokenizer.from_folder(folder.tokenizer_dir)
        self._engines: dict[str, Engine] = {}
        # Resolve every graph now, so a missing part or precision fails before any work.
        self._graphs = {
            name: folder.graph(name, ENGINE_FORMATS[engine], precision)
            for name in ("text_encoder", "unet", "vae_decoder")
        }
        if not low_memory:
            for name in self._graphs:
                self._engine(name)

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
    ) -> Pipeline:
        """Open the converted-model folder at ``path`` and load its parts in ``engine`` on ``device``.

        ``compute`` is the arithmetic precision (f32, bf16, f16, or auto: the device's default)."""
        return cls(
            ModelFolder.open(path),
            engine=engine,
            device=device,
            precision=precision,
            low_memory=low_memory,
            threads=threads,
            compute=compute,
        )

    @property
    def default_sampler(self) -> str:
        """The sampler the model's own scheduler config names (SD 1.5: PNDM)."""
        return _DEFAULT_SAMPLERS.get(self.folder.scheduler_config.get("_class_name", ""), "Euler a")

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

    def _engine(self, name: str) -> Engine:
        if name not in self._engines:
            self._engines[name] = load_engine(
                self._graphs[name], self.engine_name, self.device, self.threads, self.compute
            )
        return self._engines[name]

    def _done_with(self, name: str) -> None:
        if self.low_memory and name in self._engines:
            self._engines.pop(name).release()

    def encode_prompt(self, prompts: list[str]) -> np.ndarray:
        """Token ids -> the text encoder's last hidden state, (len(prompts), 77, width)."""
        ids = self.tokenizer(prompts)
        return self._engine("text_encoder").run({"input_ids": ids})["last_hidden_state"].astype(np.float32)

    def decode_latents(self, latents: np.ndarray) -> np.ndarray:
        """Latents -> images in 0..1, (batch, H, W, 3); one image at a time to bound memory."""
        scaled = latents / self.folder.manifest.vae_scaling_factor
        vae = self._engine("vae_decoder")
        images = [vae.run({"latent_sample": scaled[i : i + 1]})["sample"] for i in range(len(scaled))]
        image = np.concatenate(images).astype(np.float32)
        return np.clip(image / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)

    def _check(
        self,
        prompt: str,
        negative_prompt: str,
        steps: int,
        cfg_scale: float,
        sampler: str | None,
        seed: int | None,
        width: int | None,
        height: int | None,
        batch: int,
    ) -> GenerationRequest:
        width = width or self.default_size[0]
        height = height or self.default_size[1]
        check_size(width, height)
        if steps < 1:
            raise InputError(f"steps {steps}: must be at least 1")
        if batch < 1:
            raise InputError(f"batch {batch}: must be at least 1")
        if seed is None or seed < 0:
            seed = int(np.random.default_rng().integers(0, 2**32))
        if seed > MAX_SEED:
            raise InputError(f"seed {seed}: must be at most 2**64-1")
        try:
            sampler = schedulers.canonical_name(sampler or self.default_sampler)
            schedulers.create(sampler, self.folder.scheduler_config)  # fails early on an unsupported config
        except ValueError as exc:
            raise InputError(str(exc)) from None
        return GenerationRequest(
            prompt, negative_prompt or "", steps, float(cfg_scale), sampler, seed, width, height, batch
        )

    def txt2img(
        self,
        prompt: str,
        negative_prompt: str = "",
        steps: int = 20,
        cfg_scale: float = 7.5,
        sampler: str | None = None,
        seed: int | None = None,
        width: int | None = None,
        height: int | None = None,
        batch: int = 1,
        latents: np.ndarray | None = None,
        output_type: str = "pil",
        progress: bool = True,
        callback: Callable[[int, np.ndarray], None] | None = None,
    ) -> list[Image.Image] | np.ndarray:
        """Generate ``batch`` images for ``prompt``.

        Image ``i`` uses seed ``seed + i`` (as AUTOMATIC1111 does), so any image of a batch can be made again
        alone. ``latents``, when given, replaces the initial noise (shape (batch, 4, height/8, width/8)).
        ``output_type="np"`` returns the decoded float images (batch, H, W, 3) in 0..1 instead of PIL images;
        PIL images carry their infotext in ``image.info["parameters"]``.
        """
        request = self._check(prompt, negative_prompt, steps, cfg_scale, sampler, seed, width, height, batch)
        scheduler = schedulers.create(request.sampler, self.folder.scheduler_config)
        scheduler.set_timesteps(request.steps)
        shape = (1, LATENT_CHANNELS, request.height // 8, request.width // 8)
        noise = [NoiseGenerator(request.seed + i) for i in range(request.batch)]
        initial = np.concatenate([gen.randn(shape) for gen in noise])
        if latents is not None:
            latents = np.asarray(latents, dtype=np.float32)
            if latents.shape != initial.shape:
                raise InputError(f"latents of shape {latents.shape}: expected {initial.shape}")
            initial = latents
        latents = initial * np.float32(scheduler.init_noise_sigma)

        # diffusers applies guidance only when cfg > 1; below that the unconditional pass is skipped.
        guided = request.cfg_scale > 1.0
        prompts = [request.negative_prompt, request.prompt] if guided else [request.prompt]
        embeddings = self.encode_prompt(prompts)
        self._done_with("text_encoder")
        context = np.repeat(embeddings, request.batch, axis=0)

        unet = self._engine("unet")
        for i, t in enumerate(tqdm(scheduler.timesteps, desc="denoise", unit="step", disable=not progress)):
            model_input = np.concatenate([latents, latents]) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            timestep = np.full((len(model_input),), t, dtype=np.float32)
            eps = unet.run({"sample": model_input, "timestep": timestep, "encoder_hidden_states": context})[
                "out_sample"
            ]
            if guided:
                uncond, cond = np.split(eps, 2)
                eps = uncond + np.float32(request.cfg_scale) * (cond - uncond)
            step_noise = np.concatenate([gen.randn(shape) for gen in noise]) if scheduler.stochastic else None
            latents = scheduler.step(eps, t, latents, noise=step_noise).astype(np.float32)
            if callback is not None:
                callback(i, latents)
        self._done_with("unet")

        images = self.decode_latents(latents)
        self._done_with("vae_decoder")
        if output_type == "np":
            return images
        return self._with_infotext(images, request)

    def _with_infotext(self, images: np.ndarray, request: GenerationRequest) -> list[Image.Image]:
        from sdlite.images import to_pil

        manifest = self.folder.manifest
        model_hash = self.folder.model_hash
        result = to_pil(images)
        for i, image in enumerate(result):
            image.info["parameters"] = format_infotext(
                request.prompt,
                request.negative_prompt,
                {
                    "Steps": request.steps,
                    "Sampler": request.sampler,
                    "CFG scale": request.cfg_scale,
                    "Seed": request.seed + i,
                    "Size": f"{request.width}x{request.height}",
                    "Model hash": short_hash(model_hash) if model_hash else None,
                    "Model": manifest.name,
                    "Engine": self.engine_name,
                    "Compute": self.compute_precision,
                    "Version": f"sdlite {__version__}",
                },
            )
        return result

    def release(self) -> None:
        """Free every loaded part."""
        for engine in self._engines.values():
            engine.release()
        self._engines.clear()
