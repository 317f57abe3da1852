"""The denoising loop every mode shares: the guided model call and the sampler walking its schedule.

:class:`Denoiser` owns classifier-free guidance (Ho & Salimans 2022, eq. 6: one U-Net batch of
[unconditional, conditional], combined as ``uncond + s * (cond - uncond)``; at a scale of 1 or below the
unconditional half is never run) with its optional rescale, the sampler's input scaling, and the model inputs
beside the sample (the family's conditioning, an inpainting U-Net's mask channels), passed to the graph by input
name.

:func:`schedule_start` is where img2img and inpainting strength cut the schedule: at the start of a sampler
step (``order`` evaluations), so a two-evaluation sampler never starts in the middle of one; the count of model
evaluations is the one diffusers' img2img pipelines run. The loop starts the sampler there explicitly
(``begin``), never by looking a timestep up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from sdlite import schedulers
from sdlite.engines import Engine
from sdlite.errors import InputError, non_finite

# callback(step, total, latents, denoised): after model evaluation ``step`` (0-based) of ``total``, the current
# latents and the model's clean-latent estimate at that evaluation (what previews decode). A callback that
# returns True stops the loop there: the image is then made from that clean-latent estimate (an interrupt).
StepCallback = Callable[[int, int, np.ndarray, np.ndarray], bool | None]


def steps_to_run(steps: int, strength: float) -> int:
    """Sampler steps that strength ``strength`` re-runs of a ``steps``-step schedule: int(steps * strength), as
    diffusers' get_timesteps counts, and at least one (A1111 runs one step at the smallest strengths too)."""
    return max(1, min(int(steps * strength), steps))


def schedule_start(scheduler: schedulers.Scheduler, steps: int, strength: float) -> int:
    """The entry of the scheduler's schedule (already set for ``steps``) where SDEdit at ``strength`` begins (Meng
    et al. 2022): the first evaluation of step ``steps - steps_to_run``. Strength 1 runs everything (entry 0)."""
    if strength >= 1.0:
        return 0
    start = (steps - steps_to_run(steps, strength)) * scheduler.order
    if start >= len(scheduler.timesteps):
        raise InputError(f"strength {strength} with {steps} steps leaves no step to run; raise strength or steps")
    return start


def training_sigmas(scheduler: schedulers.Scheduler) -> np.ndarray:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) of every training timestep of ``scheduler``."""
    table = scheduler.alphas_cumprod
    return ((1 - table) / table) ** 0.5


def predicted_x0(
    scheduler: schedulers.Scheduler, sigmas: np.ndarray, model_input: np.ndarray, output: np.ndarray, t: float
) -> np.ndarray:
    """The clean latents the model's ``output`` implies at timestep ``t``; ``sigmas`` from :func:`training_sigmas`.

    Every sampler feeds the model the variance-preserving sample x = sqrt(a) x0 + sqrt(1 - a) eps (Ho et al.
    2020, eq. 4), with a = alpha_bar(t) = 1 / (1 + sigma(t)^2) and sigma(t) interpolated from the training
    table as the sigma samplers do for fractional timesteps."""
    sigma = float(np.interp(float(t), np.arange(len(sigmas)), sigmas))
    a = 1.0 / (1.0 + sigma * sigma)
    prediction = getattr(scheduler, "prediction_type", "epsilon")
    if prediction == "epsilon":
        x0 = (model_input - (1 - a) ** 0.5 * output) / a**0.5
    elif prediction == "v_prediction":  # Salimans & Ho 2022: v = sqrt(a) eps - sqrt(1 - a) x0
        x0 = a**0.5 * model_input - (1 - a) ** 0.5 * output
    else:
        x0 = output
    return np.asarray(x0, dtype=np.float32)


@dataclass
class Denoiser:
    """The guided U-Net call at one timestep.

    ``conditioning`` holds the graph inputs other than the sample and timestep, batched as
    [unconditional..., conditional...] when guided (``cfg_scale > 1``), conditional only otherwise;
    ``channels`` are extra input channels concatenated after the scaled sample (an inpainting U-Net's mask and
    masked-image latents), for one copy of the batch. ``cfg_rescale`` phi > 0 rescales the guided prediction
    towards the conditional one's standard deviation (Lin et al. 2024, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", eq. 15-16), as diffusers' ``guidance_rescale``."""

    unet: Engine
    conditioning: Mapping[str, np.ndarray]
    cfg_scale: float
    channels: np.ndarray | None = None
    cfg_rescale: float = 0.0
    _copies: int = field(init=False)

    def __post_init__(self) -> None:
        self._copies = 2 if self.guided else 1
        if self.channels is not None:
            self.channels = np.concatenate([self.channels] * self._copies)

    @property
    def guided(self) -> bool:
        """Whether the unconditional prediction is computed (CFG scale above 1)."""
        return self.cfg_scale > 1.0

    def __call__(self, scheduler: schedulers.Scheduler, latents: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
        """(guided model output, the scaled model input of the latents) at timestep ``t``."""
        scaled = scheduler.scale_model_input(latents, t)
        model_input = np.concatenate([scaled] * self._copies)
        if self.channels is not None:
            model_input = np.concatenate([model_input, self.channels], axis=1)
        output = self.unet.run(
            {
                "sample": model_input.astype(np.float32, copy=False),
                "timestep": np.full((len(model_input),), t, dtype=np.float32),
                **self.conditioning,
            }
        )["out_sample"]
        if self.guided:
            uncond, cond = np.split(output, 2)
            output = uncond + np.float32(self.cfg_scale) * (cond - uncond)
            if self.cfg_rescale > 0:
                output = rescale_guidance(output, cond, self.cfg_rescale)
        return output, scaled


def rescale_guidance(guided: np.ndarray, cond: np.ndarray, phi: float) -> np.ndarray:
    """Lin et al. 2024, eq. 15-16: the guided prediction scaled to the conditional prediction's standard deviation
    (per image), mixed with the unscaled one by ``phi``; keeps high CFG from over-exposing zero-SNR models."""
    axes = tuple(range(1, guided.ndim))
    rescaled = guided * (cond.std(axis=axes, keepdims=True) / guided.std(axis=axes, keepdims=True))
    return (np.float32(phi) * rescaled + np.float32(1 - phi) * guided).astype(np.float32)


def denoise(
    scheduler: schedulers.Scheduler,
    start: int,
    latents: np.ndarray,
    denoiser: Denoiser,
    draw_noise: Callable[[], np.ndarray],
    after_step: Callable[[int, np.ndarray], np.ndarray] | None = None,
    callback: StepCallback | None = None,
    progress: bool = True,
    handoff: tuple[int, Callable[[], Denoiser]] | None = None,
) -> np.ndarray:
    """Run ``scheduler`` from entry ``start`` of its schedule (see :func:`schedule_start`) to the end, from
    ``latents``; returns the final latents. ``handoff`` = (entry, make): from schedule entry ``entry`` on, the
    denoiser ``make()`` returns takes over (a refiner), the sampler's state carried on as A1111 carries it.

    ``draw_noise`` gives the fresh noise a stochastic sampler adds at each evaluation; ``after_step(entry,
    latents)`` may change the latents after the evaluation at schedule entry ``entry`` (inpainting with a regular
    U-Net blends the kept area back). ``callback`` may stop the loop early (see :data:`StepCallback`)."""
    scheduler.begin(start)
    timesteps = np.asarray(scheduler.timesteps)[start:]
    total = len(timesteps)
    sigmas = training_sigmas(scheduler) if callback is not None else None
    for i, t in enumerate(tqdm(timesteps, desc="denoise", unit="step", disable=not progress)):
        if handoff is not None and start + i == handoff[0]:
            denoiser = handoff[1]()
        output, scaled = denoiser(scheduler, latents, t)
        step_noise = draw_noise() if scheduler.stochastic else None
        latents = scheduler.step(output, t, latents, noise=step_noise).astype(np.float32, copy=False)
        # A few thousand values per step: checking costs nothing beside the U-Net and names the step that broke.
        if not np.isfinite(latents).all():
            raise non_finite(f"the U-Net at step {i + 1} of {total}")
        if after_step is not None:
            latents = after_step(start + i, latents)
        if callback is not None:
            denoised = predicted_x0(scheduler, sigmas, scaled, output, t)
            if callback(i, total, latents, denoised):
                return denoised.astype(np.float32, copy=False)
    return latents


def handoff_entry(timesteps: np.ndarray, start: int, switch: float, train_steps: int = 1000) -> int | None:
    """The first schedule entry from ``start`` whose timestep has ``switch`` (0..1] of the noise removed, where a
    refiner takes over: A1111's "Refiner switch at" measured on the timestep, (last - t) / train_steps >= switch, which
    is diffusers' ``denoising_end`` cut (t < train_steps (1 - switch)) for integer timesteps. None: never."""
    last = train_steps - 1
    for entry in range(start, len(timesteps)):
        if (last - round(float(timesteps[entry]))) / train_steps >= switch:
            return entry
    return None
