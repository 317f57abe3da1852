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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from .ddim import DDIMScheduler
from .dpmpp_2m import DPMPP2MScheduler
from .euler_ancestral import EulerAncestralScheduler
from .pndm import PNDMScheduler

__all__ = [
    "DDIMScheduler",
    "DPMPP2MScheduler",
    "EulerAncestralScheduler",
    "PNDMScheduler",
    "Scheduler",
    "UnknownSamplerError",
    "create",
    "names",
]


class Scheduler(Protocol):
    """What every sampler provides (diffusers' scheduler contract, numpy in and out, float32)."""

    init_noise_sigma: float
    timesteps: np.ndarray  # model timesteps after set_timesteps, in the order to run them
    stochastic: bool  # True when step() needs a standard normal `noise` array
    order: int  # model evaluations per entry of `timesteps`

    def set_timesteps(self, num_inference_steps: int) -> None: ...

    def scale_model_input(self, sample: np.ndarray, timestep: Any) -> np.ndarray: ...

    def step(
        self, model_output: np.ndarray, timestep: Any, sample: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray: ...

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: Any) -> np.ndarray: ...


class UnknownSamplerError(ValueError):
    """Raised by :func:`create` for a sampler name it does not know."""


_SAMPLERS: dict[str, Callable[[Mapping[str, Any] | None], Scheduler]] = {
    "DDIM": DDIMScheduler,
    "DPM++ 2M Karras": DPMPP2MScheduler,
    "Euler a": EulerAncestralScheduler,
    "PNDM": PNDMScheduler,
}


def _normalize(name: str) -> str:
    # "Euler a", "euler_a", "EULER-A" and "eulera" all name the same sampler.
    return "".join(ch for ch in name.lower() if ch not in " _-")


_BY_KEY = {_normalize(name): name for name in _SAMPLERS}


def names() -> list[str]:
    """Return the sampler names :func:`create` accepts, as AUTOMATIC1111 spells them, sorted."""
    return sorted(_SAMPLERS)


def canonical_name(name: str) -> str:
    """The A1111 spelling of a sampler name given in any case or spacing; UnknownSamplerError if unknown."""
    canonical = _BY_KEY.get(_normalize(str(name)))
    if canonical is None:
        raise UnknownSamplerError(f"unknown sampler {name!r}; known samplers: {', '.join(names())}")
    return canonical


def create(name: str, config: Mapping[str, Any] | None = None) -> Scheduler:
    """Build the sampler called ``name`` (case, spaces, '_' and '-' ignored) from a diffusers scheduler config.

    Raises UnknownSamplerError for an unknown name, ValueError or NotImplementedError for a config option
    the sampler does not support.
    """
    return _SAMPLERS[canonical_name(name)](config)
