"""Per-stage wall time and peak memory of one generation, measured by wrapping the calls of each stage.

A stage (text encoder, U-Net, VAE decoder) begins at its first call after another stage ran and ends when
the next stage begins, so loading a part in low-memory mode counts in the stage that needs it.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections import defaultdict
from collections.abc import Callable

from sdlite.benchmarks.memory import PeakTracker
from sdlite.layout import TEXT_ENCODER_2, TINY_VAE_DECODER

TEXT_ENCODER, UNET, VAE_DECODER = "text_encoder", "unet", "vae_decoder"


class Stages:
    """Times every call of each stage and follows the stage's peak RSS with a :class:`PeakTracker`."""

    def __init__(self, tracker: PeakTracker):
        self.tracker = tracker
        # Off while a warm-up runs: its memory is one stage of its own, not spread over the stages it calls.
        self.track_memory = True
        self.current: str | None = None
        self.calls: dict[str, list[float]] = defaultdict(list)

    def enter(self, name: str) -> None:
        """Begin stage ``name`` unless it is the one running."""
        if name != self.current:
            if self.track_memory:
                self.tracker.start(name)
            self.current = name

    def finish(self) -> None:
        """End the running stage."""
        if self.track_memory:
            self.tracker.stop()
        self.current = None

    def timed(self, name: str, fn: Callable) -> Callable:
        """``fn`` wrapped so that each call enters stage ``name`` and records its seconds."""

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            self.enter(name)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.calls[name].append(time.perf_counter() - start)

        return wrapper

    def clear(self) -> None:
        """Forget the calls timed so far (after a warm-up); stage peaks are kept by the tracker."""
        self.calls.clear()


# SDXL's second text encoder is part of the text-encoder stage; the tiny VAE's decoder, when it makes the image,
# is the VAE-decode stage.
_STAGE_OF_PART = {TEXT_ENCODER_2: TEXT_ENCODER, TINY_VAE_DECODER: VAE_DECODER}


class StageObserver:
    """A part-pool observer (``sdlite.parts.PartObserver``) that feeds :class:`Stages`: a part's load or run
    enters its stage; runs are timed as the stage's calls, loads as calls["load"]."""

    def __init__(self, stages: Stages):
        self.stages = stages

    def before(self, part: str, action: str) -> None:
        """Enter the part's stage."""
        self.stages.enter(_STAGE_OF_PART.get(part, part))

    def after(self, part: str, action: str, seconds: float) -> None:
        """Record the call's seconds."""
        self.stages.calls["load" if action == "load" else _STAGE_OF_PART.get(part, part)].append(seconds)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between the closest ranks."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(stages: Stages, total_s: float) -> dict:
    """Milliseconds per stage of the generation just timed: text encoder and VAE decode in total, U-Net per
    step (median, p90, every step)."""
    unet = [s * 1000 for s in stages.calls.get(UNET, [])]
    return {
        "text_encoder_ms": sum(stages.calls.get(TEXT_ENCODER, [])) * 1000,
        "unet_step_ms": {
            "median": statistics.median(unet) if unet else None,
            "p90": percentile(unet, 90) if unet else None,
            "steps": [round(v, 3) for v in unet],
        },
        "vae_decode_ms": sum(stages.calls.get(VAE_DECODER, [])) * 1000,
        "total_s": total_s,
    }
