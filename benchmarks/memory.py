"""Resident memory of this process: now, the peak of one stage, and the peak of the whole run.

On Linux the kernel keeps a high-water mark of the resident set (VmHWM in /proc/self/status); writing "5"
to /proc/self/clear_refs resets it to the current RSS, so the peak of one stage is read exactly, without
sampling. Elsewhere a thread samples the RSS every few milliseconds (a short spike between samples can be
missed, so those figures are labelled as sampled).
"""

from __future__ import annotations

import resource
import sys
import threading
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")
_SAMPLE_SECONDS = 0.005
MB = 1 << 20


def _status_kib(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss_mb() -> float | None:
    """The resident set now, in MiB (None where the platform does not say)."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib / 1024
    try:
        import psutil  # optional: macOS and Windows

        return psutil.Process().memory_info().rss / MB
    except ImportError:
        return None


def max_rss_mb() -> float:
    """getrusage's ru_maxrss: the process's peak resident set so far, in MiB (KiB on Linux, bytes on macOS)."""
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value / MB if sys.platform == "darwin" else value / 1024


def _can_reset_hwm() -> bool:
    if _status_kib("VmHWM") is None:
        return False
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


class PeakTracker:
    """Peak RSS per stage and over the whole run.

    ``start(stage)`` begins a stage and ends the one before; ``stop()`` ends the last. Resetting VmHWM also
    resets what getrusage reports for this process (the kernel derives ru_maxrss from the same counter), so
    the whole-run peak is kept here as the maximum of ru_maxrss before the first reset and every stage's
    peak."""

    def __init__(self) -> None:
        self.method = "VmHWM reset via /proc/self/clear_refs" if _can_reset_hwm() else "RSS sampled every 5 ms"
        self.exact = self.method.startswith("VmHWM")
        self.stages: dict[str, float] = {}
        self._whole = max_rss_mb()
        self._stage: str | None = None
        self._sampled = 0.0
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(_SAMPLE_SECONDS):
            self._sampled = max(self._sampled, current_rss_mb() or 0.0)

    def _stage_peak(self) -> float:
        if self.exact:
            return (_status_kib("VmHWM") or 0) / 1024
        return max(self._sampled, current_rss_mb() or 0.0)

    def start(self, stage: str) -> None:
        """End the current stage (if any) and start measuring ``stage``'s peak from the RSS of now."""
        self.stop()
        self._stage = stage
        if self.exact:
            self._whole = max(self._whole, max_rss_mb(), self._stage_peak())
            _CLEAR_REFS.write_text("5")
        else:
            self._sampled = current_rss_mb() or 0.0
            self._stop.clear()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()

    def stop(self) -> None:
        """End the current stage; a stage run twice keeps the larger peak."""
        if self._stage is None:
            return
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self._sampler = None
        peak = self._stage_peak()
        self.stages[self._stage] = max(self.stages.get(self._stage, 0.0), peak)
        self._whole = max(self._whole, peak)
        self._stage = None

    @property
    def whole_mb(self) -> float:
        """The peak RSS of the process so far, in MiB."""
        current = self._stage_peak() if self._stage is not None else 0.0
        return max(self._whole, max_rss_mb(), current)
