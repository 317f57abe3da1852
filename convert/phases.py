"""The phases of a conversion: progress with part, variant, phase and ETA, and each phase's time and peak memory.

Each phase's peak is the process's resident-set high-water mark over that phase alone (Linux lets a process
reset its mark by writing 5 to ``/proc/self/clear_refs``); elsewhere the peak is the process's so far.
"""

from __future__ import annotations

import contextlib
import gc
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from tqdm.auto import tqdm

PHASES = ("export", "calibrate", "convert", "quantize", "validate")


@dataclass
class PhaseFigure:
    """Seconds and peak resident memory of one phase of one part variant."""

    part: str
    variant: str
    phase: str
    seconds: float
    peak_bytes: int


def _reset_peak() -> None:
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")


def peak_rss_bytes() -> int:
    """The resident-set high-water mark since the last reset (or since the process started)."""
    if sys.platform.startswith("linux"):
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the system, so the next phase starts low."""
    gc.collect()
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


class PhaseMeter:
    """A progress bar over the conversion's work units and a record of every phase.

    ``total`` is in work units (an estimate of each step's cost, so that the ETA weighs a U-Net
    quantization above a VAE export); :meth:`phase` names what runs, :meth:`advance` moves the bar."""

    def __init__(self, total: float, quiet: bool):
        self.figures: list[PhaseFigure] = []
        self.quiet = quiet
        self._bar = tqdm(
            total=round(total, 1), desc="convert", unit="u", disable=quiet, bar_format=_BAR_FORMAT, leave=True
        )

    @contextlib.contextmanager
    def phase(self, part: str, variant: str, phase: str) -> Iterator[None]:
        """Measure one phase (time, peak memory) and show it on the progress bar."""
        self._bar.set_description_str(f"convert {part} {variant}: {phase}")
        release_freed_memory()
        _reset_peak()
        start = time.perf_counter()
        yield
        self.figures.append(PhaseFigure(part, variant, phase, time.perf_counter() - start, peak_rss_bytes()))

    def advance(self, units: float) -> None:
        """Count ``units`` of work done."""
        self._bar.update(round(units, 1))

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
