"""The phases of a conversion: progress with part, variant, phase and ETA, and each phase's time and peak memory.

Each phase's peak is the largest resident set seen over that phase by a side thread that reads it every
``SAMPLE_INTERVAL_S`` (the process's own high-water mark is left alone, so ``/usr/bin/time`` still reports the
whole conversion's peak).
"""

from __future__ import annotations

import contextlib
import gc
import resource
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from tqdm.auto import tqdm

SAMPLE_INTERVAL_S = 0.05


@dataclass
class PhaseFigure:
    """Seconds and peak resident memory of one phase of one part variant."""

    part: str
    variant: str
    phase: str
    seconds: float
    peak_bytes: int


def resident_bytes() -> int:
    """The process's resident set now (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


class _PeakSampler:
    """Tracks the largest resident set while a block runs."""

    def __init__(self) -> None:
        self.peak = resident_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sdlite-phase-peak", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self.peak = max(self.peak, resident_bytes())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, resident_bytes())


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the system, so the next phase starts low."""
    gc.collect()
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


class PhaseMeter:
    """A progress bar over the conversion's work units and a record of every phase.

    ``total`` is the estimated seconds of all steps (so that the ETA weighs a U-Net quantization above a VAE
    export); :meth:`phase` names what runs, :meth:`advance` moves the bar by a finished step's estimate."""

    def __init__(self, total: float, quiet: bool):
        self.figures: list[PhaseFigure] = []
        self.quiet = quiet
        self._bar = tqdm(total=total, desc="convert", unit="s", disable=quiet, bar_format=_BAR_FORMAT, leave=True)

    @contextlib.contextmanager
    def phase(self, part: str, variant: str, phase: str) -> Iterator[None]:
        """Measure one phase (time, peak memory) and show it on the progress bar."""
        self._bar.set_description_str(f"convert {part} {variant}: {phase}")
        release_freed_memory()
        sampler = _PeakSampler()
        start = time.perf_counter()
        try:
            yield
        finally:
            peak = sampler.stop()
        self.figures.append(PhaseFigure(part, variant, phase, time.perf_counter() - start, peak))

    def advance(self, units: float) -> None:
        """Count ``units`` of work done."""
        self._bar.update(max(0.0, min(units, self._bar.total - self._bar.n)))

    def write(self, line: str) -> None:
        """Print a line above the progress bar (nothing with ``quiet``)."""
        if not self.quiet:
            tqdm.write(line)

    def close(self) -> None:
        """Finish the bar."""
        self._bar.close()

    def table(self) -> str:
        """Every phase with its seconds and peak, then :meth:`summary`."""
        rows = [f"{'part':<15}{'variant':<16}{'phase':<11}{'seconds':>9}{'peak GB':>9}"]
        for f in self.figures:
            rows.append(f"{f.part:<15}{f.variant:<16}{f.phase:<11}{f.seconds:>9.1f}{f.peak_bytes / 1e9:>9.2f}")
        return "\n".join([*rows, self.summary()])

    def summary(self) -> str:
        """The phases' total seconds and the largest peak, with the phase that reached it."""
        if not self.figures:
            return "nothing left to do"
        top = max(self.figures, key=lambda f: f.peak_bytes)
        seconds = sum(f.seconds for f in self.figures)
        return (
            f"{len(self.figures)} phases in {seconds:.0f} s; largest peak {top.peak_bytes / 1e9:.2f} GB "
            f"({top.part} {top.variant} {top.phase})"
        )


_BAR_FORMAT = "{desc:<44} {percentage:3.0f}%|{bar:20}| {elapsed}<{remaining}"
