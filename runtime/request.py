"""One generation request: every parameter a caller gives, checked once, then frozen.

The CLI, the Python API and the benchmarks all build a :class:`GenerationRequest` through
:func:`make_request`; error messages name the parameter (``cfg_scale``, ``steps``), which the CLI maps to its
own flags. The name enumerations (samplers, schedules, seed sources) come from their own modules, so the CLI's
choices and these checks agree.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import numpy as np

from sdlite import schedulers
from sdlite.conditioning import check_clip_skip
from sdlite.errors import InputError, SdliteWarning
from sdlite.rng import DEFAULT_SOURCE, SOURCES

MAX_SEED = 2**64 - 1
# Far beyond any useful value; the bounds keep a typo (cfg 7000) from running for minutes to a blank image.
MAX_STEPS = 1000
MAX_CFG_SCALE = 100.0
MAX_BATCH = 64
# Sides beyond this are refused before any image of that size is allocated; the memory guard refuses far less.
MAX_SIDE = 65536


@dataclass(frozen=True)
class GenerationRequest:
    """Checked parameters of one generation (any mode)."""

    prompt: str
    negative_prompt: str
    steps: int
    cfg_scale: float
    sampler: str
    seed: int
    width: int
    height: int
    batch: int
    seed_source: str = DEFAULT_SOURCE
    schedule: str | None = None
    clip_skip: int = 1
    watermark: bool = False
    # Guidance rescale phi (Lin et al. 2024, eq. 16; A1111's "CFG Rescale"): 0 is plain classifier-free guidance.
    cfg_rescale: float = 0.0
    # The model takes the CFG scale as an input (a latent consistency U-Net's guidance embedding) instead of
    # running an unconditional pass.
    embedded_guidance: bool = False
    # With a refiner: the fraction of the schedule after which it takes over (A1111's "Refiner switch at").
    refiner_switch: float | None = None

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance runs (an unconditional pass beside the conditional one): above CFG 1
        (at 1 it equals the conditional prediction), unless the model embeds the scale."""
        return self.cfg_scale > 1.0 and not self.embedded_guidance


def check_size(width: int, height: int) -> None:
    """Width and height must be positive multiples of 8 (the VAE's downsampling factor), at most ``MAX_SIDE``."""
    if width < 8 or height < 8 or width % 8 or height % 8:
        raise InputError(f"size {width}x{height}: width and height must be positive multiples of 8")
    if max(width, height) > MAX_SIDE:
        raise InputError(f"size {width}x{height}: width and height must be at most {MAX_SIDE}")


def check_strength(strength: float) -> None:
    """Strength is the fraction of the schedule that is re-run: (0, 1]."""
    if not is_finite_number(strength) or not 0.0 < float(strength) <= 1.0:
        raise InputError(f"strength {strength}: must be above 0 and at most 1")


def is_finite_number(value: Any) -> bool:
    """Whether ``value`` is a real, finite number (not a bool, NaN or infinity)."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))


def chosen_seed(seed: Any) -> Any:
    """``seed``, or a random one in 0 .. 2**32 - 1 when it is None or negative (A1111's -1); other values are
    returned as they are, for the caller's check."""
    if seed is None or (isinstance(seed, Real) and not isinstance(seed, bool) and seed < 0):
        return int(np.random.default_rng().integers(0, 2**32))
    return seed


def _integer(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or not low <= value <= high:
        raise InputError(f"{name} {value!r}: must be a whole number from {low} to {high}")
    return int(value)


# What a generation uses when neither the caller nor the model's manifest says (SD's usual settings).
DEFAULT_STEPS = 20
DEFAULT_CFG_SCALE = 7.5


def make_request(
    prompt: str,
    negative_prompt: str | None = "",
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
    refiner_switch: float | None = None,
    *,
    default_size: tuple[int, int],
    default_sampler: str,
    scheduler_config: Mapping[str, Any],
    embedded_guidance: bool = False,
    model_defaults: Mapping[str, Any] | None = None,
) -> GenerationRequest:
    """Check every parameter and fill the defaults (the model's size and sampler, a random seed when ``seed``
    is None or negative); raises InputError naming the first wrong parameter and what it should be. A negative
    prompt that no unconditional pass will read is reported with an :class:`~sdlite.errors.SdliteWarning`.

    ``model_defaults`` (the manifest's: steps, cfg_scale, sampler, schedule) fill what the caller left None: a
    few-step model's 4 steps at CFG 1. Its schedule applies to the model's own sampler, or to another sampler that
    takes it."""
    model_defaults = model_defaults or {}
    steps = model_defaults.get("steps", DEFAULT_STEPS) if steps is None else steps
    cfg_scale = model_defaults.get("cfg_scale", DEFAULT_CFG_SCALE) if cfg_scale is None else cfg_scale
    if schedule is None and model_defaults.get("schedule"):
        try:
            model_sampler = schedulers.canonical_name(sampler or default_sampler)
            schedulers.infotext_fields(model_sampler, model_defaults["schedule"])
            schedule = model_defaults["schedule"]
        except ValueError:
            pass  # a sampler the model's schedule does not suit runs its own
    if not isinstance(prompt, str):
        raise InputError(f"prompt {prompt!r}: must be text")
    if negative_prompt is not None and not isinstance(negative_prompt, str):
        raise InputError(f"negative_prompt {negative_prompt!r}: must be text")
    width = default_size[0] if width is None else _integer("width", width, 8, 1 << 16)
    height = default_size[1] if height is None else _integer("height", height, 8, 1 << 16)
    check_size(width, height)
    steps = _integer("steps", steps, 1, MAX_STEPS)
    batch = _integer("batch", batch, 1, MAX_BATCH)
    if not is_finite_number(cfg_scale) or not 0.0 <= float(cfg_scale) <= MAX_CFG_SCALE:
        raise InputError(f"cfg_scale {cfg_scale!r}: must be a finite number from 0 to {MAX_CFG_SCALE:g}")
    if not is_finite_number(cfg_rescale) or not 0.0 <= float(cfg_rescale) <= 1.0:
        raise InputError(f"cfg_rescale {cfg_rescale!r}: must be a number from 0 (off) to 1")
    seed = _integer("seed", chosen_seed(seed), 0, MAX_SEED)
    if refiner_switch is not None and not (is_finite_number(refiner_switch) and 0.0 < float(refiner_switch) <= 1.0):
        raise InputError(f"refiner_switch {refiner_switch!r}: must be a fraction of the steps above 0, at most 1")
    try:
        sampler = schedulers.canonical_name(sampler or default_sampler)
        schedulers.infotext_fields(sampler, schedule)  # an unknown schedule, or one the sampler cannot take
    except ValueError as exc:
        raise InputError(str(exc)) from None
    try:
        # Fails early on too many steps, or a scheduler config this sampler cannot run with.
        schedulers.create(sampler, scheduler_config, schedule).set_timesteps(steps)
    except (ValueError, TypeError, KeyError, IndexError, ArithmeticError, NotImplementedError) as exc:
        raise InputError(f"sampler {sampler} with the model's scheduler config: {exc}") from None
    if seed_source not in SOURCES:
        raise InputError(f"seed_source {seed_source!r}: unknown; known: {', '.join(SOURCES)}")
    check_clip_skip(clip_skip)
    request = GenerationRequest(
        prompt,
        negative_prompt or "",
        steps,
        float(cfg_scale),
        sampler,
        seed,
        width,
        height,
        batch,
        seed_source,
        schedule,
        int(clip_skip),
        bool(watermark),
        float(cfg_rescale),
        embedded_guidance,
        None if refiner_switch is None else float(refiner_switch),
    )
    if request.negative_prompt and not request.guided:
        # diffusers and A1111 skip the unconditional pass here too; the user should know the text went unread.
        reason = "this model embeds the CFG scale" if embedded_guidance else f"at CFG scale {request.cfg_scale:g}"
        warnings.warn(f"the negative prompt is not used: {reason} (no unconditional pass)", SdliteWarning, 2)
    return request
