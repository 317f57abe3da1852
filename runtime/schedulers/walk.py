"""The schedule walk every sampler shares: where in its schedule a run is, and noising to a schedule entry.

``set_timesteps(n)`` lays out the schedule: ``timesteps`` (one entry per model evaluation, ``order`` entries
per sampler step) and the noise level of each entry. A run walks the entries in order, one per ``step`` call.
It starts at entry 0, at the entry :meth:`ScheduleWalk.begin` names (img2img and inpainting cut the schedule
at the start of a sampler step), or, as in diffusers' contract, at the entry of the first timestep passed.

A timestep that is not in the schedule is an error in every sampler (``ValueError`` naming the sampler): a
run never silently continues from another noise level than the one it was given.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .sigmas import index_for_timestep


class ScheduleWalk:
    """Mixin of the sampler base classes: the step index over ``timesteps`` and entry lookups.

    A class using it sets ``name``, ``order``, ``timesteps`` and ``num_inference_steps`` (None before
    ``set_timesteps``), calls :meth:`_restart` from ``set_timesteps``, and implements :meth:`noise_to`."""

    name = ""
    order = 1  # model evaluations per step: step k begins at entry k * order of `timesteps`
    timesteps: np.ndarray
    num_inference_steps: int | None
    _step_index: int | None = None

    def _restart(self) -> None:
        """Forget where the last run was (``set_timesteps`` calls this)."""
        self._step_index = None

    def begin(self, entry: int) -> None:
        """Start the next run at ``entry`` of ``timesteps``, which must begin a sampler step (a multiple of
        ``order``): a cut of the schedule such as img2img's strength makes."""
        if self.num_inference_steps is None:
            raise RuntimeError(f"{self.name}: call set_timesteps() before begin()")
        if entry % self.order or not 0 <= entry < len(self.timesteps):
            raise ValueError(
                f"{self.name}: entry {entry} does not begin a step of the {len(self.timesteps)}-entry schedule "
                f"({self.order} entries per step)"
            )
        self._step_index = entry

    def _index(self, timestep: Any) -> int:
        """The entry the run is at; the first call of a run without :meth:`begin` finds it from ``timestep``."""
        if self._step_index is None:
            # A full run starts at entry 0 even when its first timestep repeats; a mid-schedule start is looked
            # up (the second match of a repeated timestep, which begins a step).
            self._step_index = 0 if timestep == self.timesteps[0] else self._entry_of(timestep)
        return self._step_index

    def _entry_of(self, timestep: Any) -> int:
        index = index_for_timestep(self.timesteps, timestep)
        if index is None:
            raise ValueError(f"{self.name}: timestep {timestep!r} is not in the schedule set by set_timesteps()")
        return index

    def _entries_of(self, timesteps: Any) -> list[int]:
        """The entries of one or several timesteps (see :meth:`_entry_of`)."""
        return [self._entry_of(t) for t in np.asarray(timesteps).reshape(-1)]

    def noise_to(self, original_samples: np.ndarray, noise: np.ndarray, entry: int | list[int]) -> np.ndarray:
        """Noise clean samples to the level of schedule entry ``entry`` (one for all, or one per sample)."""
        raise NotImplementedError

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: Any) -> np.ndarray:
        """Noise clean samples to ``timesteps`` of the current schedule (one per sample, or one for all)."""
        return self.noise_to(original_samples, noise, self._entries_of(timesteps))
