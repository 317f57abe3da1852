"""Samplers (diffusers "schedulers") in numpy, chosen by their AUTOMATIC1111 names.

    sched = create("DPM++ 2M Karras", config)   # config: a diffusers scheduler_config.json, as a dict
    sched.set_timesteps(25)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = model(sched.scale_model_input(x, t), t)
        x = sched.step(eps, t, x, noise=rng.randn(x.shape) if sched.stochastic else None)

Each sampler reads the config keys it needs and falls back to the default of the matching diffusers
class, so it behaves like ``DiffusersClass.from_config(config)``. Samplers are stateful the way
diffusers' are (multistep history, step index): call ``set_timesteps`` before each run.

A run may start later in the schedule (img2img): ``sched.begin(k * sched.order)`` starts it at sampler step
``k`` and ``sched.noise_to(x0, noise, k * sched.order)`` noises the image to that level
(``sdlite.schedulers.walk``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .deis import DEISScheduler
from .dpm2 import DPM2Scheduler
from .dpm2_ancestral import DPM2AncestralScheduler
from .dpmpp_2m import DPMPP2MScheduler
from .dpmpp_2m_sde import DPMPP2MSDEScheduler
from .dpmpp_2s_ancestral import DPMPP2SAncestralScheduler
from .dpmpp_sde import DPMPPSDEScheduler
from .euler import EulerScheduler
from .euler_ancestral import EulerAncestralScheduler
from .heun import HeunScheduler
from .lcm import LCMScheduler
from .lms import LMSScheduler
from .pndm import PNDMScheduler
from .tcd import TCDScheduler
from .unipc import UniPCScheduler

__all__ = [
    "DDIMScheduler",
    "DDPMScheduler",
    "DEISScheduler",
    "DPM2AncestralScheduler",
    "DPM2Scheduler",
    "DPMPP2MSDEScheduler",
    "DPMPP2MScheduler",
    "DPMPP2SAncestralScheduler",
    "DPMPPSDEScheduler",
    "EulerAncestralScheduler",
    "EulerScheduler",
    "HeunScheduler",
    "LCMScheduler",
    "LMSScheduler",
    "PNDMScheduler",
    "Scheduler",
    "TCDScheduler",
    "UniPCScheduler",
    "UnknownSamplerError",
    "canonical_name",
    "canonical_schedule",
    "create",
    "infotext_fields",
    "names",
    "parse_infotext",
    "schedules",
]


class Scheduler(Protocol):
    """What every sampler provides (diffusers' scheduler contract, numpy in and out, float32)."""

    init_noise_sigma: float
    timesteps: np.ndarray  # model timesteps after set_timesteps, in the order to run them
    stochastic: bool  # True when step() needs a standard normal `noise` array
    order: int  # model evaluations per step (diffusers' meaning): step k begins at entry k * order

    def set_timesteps(self, num_inference_steps: int) -> None: ...

    def scale_model_input(self, sample: np.ndarray, timestep: Any) -> np.ndarray: ...

    def step(
        self, model_output: np.ndarray, timestep: Any, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray: ...

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: Any) -> np.ndarray: ...

    def begin(self, entry: int) -> None: ...

    def noise_to(self, original_samples: np.ndarray, noise: np.ndarray, entry: int | list[int]) -> np.ndarray: ...


class UnknownSamplerError(ValueError):
    """Raised by :func:`create` for a sampler name it does not know."""


# --- schedules ---------------------------------------------------------------------------------------------

_NO_SIGMA_FLAGS = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False}

# sdlite schedule name -> (A1111 "Schedule type" label, diffusers config overrides). "automatic" keeps the
# model's scheduler config as it is; the others set the one diffusers option that gives that schedule.
_SCHEDULES: dict[str, tuple[str, dict[str, Any]]] = {
    "automatic": ("Automatic", {}),
    "karras": ("Karras", {**_NO_SIGMA_FLAGS, "use_karras_sigmas": True}),
    "exponential": ("Exponential", {**_NO_SIGMA_FLAGS, "use_exponential_sigmas": True}),
    "beta": ("Beta", {**_NO_SIGMA_FLAGS, "use_beta_sigmas": True}),
    # Timesteps evenly spaced from the last training step down (diffusers' timestep_spacing="trailing",
    # which diffusers documents as A1111's "SGM Uniform").
    "sgm_uniform": ("SGM Uniform", {**_NO_SIGMA_FLAGS, "timestep_spacing": "trailing"}),
}
# Other spellings users write: A1111's labels are matched too (see _normalize).
# A1111's "Uniform", "Normal" and "Simple" schedulers space timesteps evenly over the training steps, which is what
# "automatic" does with an SD 1.x/2.x config ("Uniform" is also the label sdlite writes for it).
_SCHEDULE_ALIASES = {
    "": "automatic",
    "none": "automatic",
    "default": "automatic",
    "uniform": "automatic",
    "normal": "automatic",
    "simple": "automatic",
    "trailing": "sgm_uniform",
}

_SIGMA_AND_SPACING = ("automatic", "karras", "exponential", "beta", "sgm_uniform")
_SPACING_ONLY = ("automatic", "sgm_uniform")
# LCM and TCD take their timesteps from the distillation schedule and ignore timestep_spacing.
_OWN_TIMESTEPS = ("automatic",)

# --- samplers ----------------------------------------------------------------------------------------------

# A1111 sampler name -> (factory, the schedules it can take). A factory takes a diffusers config dict.
_SAMPLERS: dict[str, tuple[Callable[[Mapping[str, Any] | None], Scheduler], tuple[str, ...]]] = {
    "DDIM": (DDIMScheduler, _SPACING_ONLY),
    "DDPM": (DDPMScheduler, _SPACING_ONLY),
    "DEIS": (DEISScheduler, _SIGMA_AND_SPACING),
    "DPM++ 2M": (DPMPP2MScheduler, _SIGMA_AND_SPACING),
    "DPM++ 2M SDE": (DPMPP2MSDEScheduler, _SIGMA_AND_SPACING),
    "DPM++ 2S a": (DPMPP2SAncestralScheduler, _SIGMA_AND_SPACING),
    "DPM++ SDE": (DPMPPSDEScheduler, _SIGMA_AND_SPACING),
    "DPM2": (DPM2Scheduler, _SIGMA_AND_SPACING),
    "DPM2 a": (DPM2AncestralScheduler, _SIGMA_AND_SPACING),
    "Euler": (EulerScheduler, _SIGMA_AND_SPACING),
    "Euler a": (EulerAncestralScheduler, _SIGMA_AND_SPACING),
    "Heun": (HeunScheduler, _SIGMA_AND_SPACING),
    "LCM": (LCMScheduler, _OWN_TIMESTEPS),
    "LMS": (LMSScheduler, _SIGMA_AND_SPACING),
    "PNDM": (PNDMScheduler, _SPACING_ONLY),
    "TCD": (TCDScheduler, _OWN_TIMESTEPS),
    "UniPC": (UniPCScheduler, _SIGMA_AND_SPACING),
}

# Names from before A1111 1.9 split the schedule off: they name a sampler and its schedule together.
_COMBINED: dict[str, tuple[str, str]] = {
    "DPM++ 2M Karras": ("DPM++ 2M", "karras"),
    "DPM++ 2M SDE Karras": ("DPM++ 2M SDE", "karras"),
    "DPM++ SDE Karras": ("DPM++ SDE", "karras"),
    "DPM2 Karras": ("DPM2", "karras"),
    "DPM2 a Karras": ("DPM2 a", "karras"),
    "LMS Karras": ("LMS", "karras"),
}
_COMBINED_NAME = {pair: name for name, pair in _COMBINED.items()}


def _normalize(name: str) -> str:
    # "Euler a", "euler_a", "EULER-A" and "eulera" all name the same sampler.
    return "".join(ch for ch in name.lower() if ch not in " _-")


_BY_KEY = {_normalize(name): name for name in [*_SAMPLERS, *_COMBINED]}
_SCHEDULE_BY_KEY = {
    **{_normalize(name): name for name in _SCHEDULES},
    **{_normalize(label): name for name, (label, _) in _SCHEDULES.items()},
    **{_normalize(alias): name for alias, name in _SCHEDULE_ALIASES.items()},
}


def names() -> list[str]:
    """Return the sampler names :func:`create` accepts, as AUTOMATIC1111 spells them, sorted.

    Includes the pre-1.9 names that carry a schedule ("DPM++ 2M Karras" = "DPM++ 2M" + schedule "karras").
    """
    return sorted([*_SAMPLERS, *_COMBINED])


def schedules() -> list[str]:
    """Return the schedule names :func:`create` accepts, "automatic" (the model's own) first."""
    return list(_SCHEDULES)


def schedule_label(schedule: str) -> str:
    """A1111's label of a schedule ("karras" -> "Karras", "automatic" -> "Automatic")."""
    return _SCHEDULES[canonical_schedule(schedule)][0]


def canonical_name(name: str) -> str:
    """The A1111 spelling of a sampler name given in any case or spacing; UnknownSamplerError if unknown."""
    canonical = _BY_KEY.get(_normalize(str(name)))
    if canonical is None:
        raise UnknownSamplerError(f"unknown sampler {name!r}; known samplers: {', '.join(names())}")
    return canonical


def canonical_schedule(schedule: str | None) -> str:
    """The sdlite name of a schedule given as its name, its A1111 label or an alias, in any case or spacing.

    None, "" and "Automatic" give "automatic"; "trailing" and "SGM Uniform" give "sgm_uniform".
    """
    canonical = _SCHEDULE_BY_KEY.get(_normalize("" if schedule is None else str(schedule)))
    if canonical is None:
        raise ValueError(f"unknown schedule {schedule!r}; known schedules: {', '.join(schedules())}")
    return canonical


def _resolve(name: str, schedule: str | None) -> tuple[str, str]:
    # (sampler, schedule) with a combined name split and checked against an explicit schedule.
    sampler = canonical_name(name)
    chosen = canonical_schedule(schedule)
    if sampler in _COMBINED:
        base, implied = _COMBINED[sampler]
        if chosen not in ("automatic", implied):
            raise ValueError(
                f"sampler {sampler!r} already names the {_SCHEDULES[implied][0]} schedule; "
                f"use {base!r} with schedule {chosen!r}"
            )
        sampler, chosen = base, implied
    allowed = _SAMPLERS[sampler][1]
    if chosen not in allowed:
        raise ValueError(f"sampler {sampler!r} cannot use schedule {chosen!r}; it takes: {', '.join(allowed)}")
    return sampler, chosen


def create(name: str, config: Mapping[str, Any] | None = None, schedule: str | None = None) -> Scheduler:
    """Build the sampler called ``name`` from a diffusers scheduler config, on noise schedule ``schedule``.

    ``name`` is an A1111 sampler name (case, spaces, '_' and '-' ignored), see :func:`names`; ``schedule`` one
    of :func:`schedules` (or an A1111 label such as "Karras"), None meaning "automatic": the schedule the
    config describes. ``create("DPM++ 2M Karras", cfg)`` equals ``create("DPM++ 2M", cfg, schedule="karras")``.

    Raises UnknownSamplerError for an unknown name, ValueError for an unknown schedule, a schedule the sampler
    cannot take or a config option it does not support, NotImplementedError for a config option sdlite
    does not implement.
    """
    sampler, chosen = _resolve(name, schedule)
    return _SAMPLERS[sampler][0]({**(config or {}), **_SCHEDULES[chosen][1]})


def infotext_fields(name: str, schedule: str | None = None) -> dict[str, str]:
    """The A1111 infotext fields for a (sampler, schedule) pair, written so that old and new readers agree.

    Returns ``{"Sampler": ..., "Schedule type": ...}``:

    - "Sampler" is the pre-1.9 combined name when one exists ("DPM++ 2M Karras"), else the sampler name.
      Readers before A1111 1.9 know only that field; 1.9+ strips a schedule suffix from it, so the
      combined name reads back as ("DPM++ 2M", Karras) there too.
    - "Schedule type" is always a concrete label: "Karras", "Exponential", "Beta", "SGM Uniform", or
      "Uniform" for "automatic" (timesteps evenly spaced over the training steps, the model config's
      spacing). "Automatic" is never written: in A1111 1.9+ it means a per-sampler default (Karras for
      "DPM++ 2M"), which is not what sdlite ran.

    Pairs without a pre-1.9 name ("Euler" + Karras) lose the schedule for old readers, who see "Euler".
    """
    sampler, chosen = _resolve(name, schedule)
    label = "Uniform" if chosen == "automatic" else _SCHEDULES[chosen][0]
    return {"Sampler": _COMBINED_NAME.get((sampler, chosen), sampler), "Schedule type": label}


def parse_infotext(fields: Mapping[str, str]) -> tuple[str, str]:
    """Read (sampler, schedule) back from infotext fields written by :func:`infotext_fields` or by A1111.

    A combined "Sampler" name wins over "Schedule type" (as in A1111 1.9+); "Uniform" and "Automatic" read
    as "automatic". Raises UnknownSamplerError / ValueError for names sdlite does not know.
    """
    sampler = canonical_name(fields["Sampler"])
    label = str(fields.get("Schedule type", "") or "")
    schedule = "automatic" if _normalize(label) in ("uniform", "automatic", "") else canonical_schedule(label)
    if sampler in _COMBINED:
        return _COMBINED[sampler]
    return _resolve(sampler, schedule)
