"""One worker thread that runs the server's jobs one at a time, and the progress it reports while it does.

Generations and model switches share the queue, so a switch waits for the running generation and the next
generation waits for the switch. Each job's result goes to its own future; a job whose client went away before it
started is dropped, and one running is interrupted. The progress (A1111's ``/sdapi/v1/progress``) is updated from
the pipeline's step callback, which is also where an interrupt takes effect: at the next step, the image then made
from the model's current estimate, as A1111 does.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from sdlite.images import png_base64

# A progress poll that asks for the current image keeps previews coming for this long.
PREVIEW_INTEREST_S = 5.0


class QueueFull(Exception):
    """Too many jobs are waiting; the request is refused (HTTP 503) rather than queued without bound."""


@dataclass
class Job:
    """A unit of work for the worker: ``run(progress)`` runs in the worker thread; its result ends in ``future``."""

    kind: str
    run: Callable[[Progress], Any]
    id: str = ""
    future: Future = field(default_factory=Future)
    cancelled: bool = False


class Progress:
    """What the running job has done so far, updated by the worker and read by progress polls."""

    def __init__(self, preview_every: int):
        self.preview_every = preview_every
        self._lock = threading.Lock()
        self._preview_wanted_until = 0.0
        self.interrupted = False
        self.skipped = False
        self._reset("", "", 0)

    def _reset(self, job: str, task: str, job_count: int) -> None:
        self.job = job
        self.task = task
        self.job_count = job_count
        self.job_no = 0
        self.step = 0
        self.steps = 0
        self.started = time.monotonic()
        self.timestamp = datetime.now().strftime("%Y%m%d%H%M%S")
        self.preview: str | None = None
        self.preview_id = -1
        self._last_preview_step = -1

    def start(self, job: Job) -> None:
        """``job`` begins (it sets ``job_count``, its denoising passes, once it knows them)."""
        with self._lock:
            self._reset(job.kind, job.id, 1)
            self.interrupted = self.skipped = False

    def finish(self) -> None:
        """The job ended: the server is idle until the next one."""
        with self._lock:
            self._reset("", "", 0)

    def begin_pass(self, job_no: int, steps: int) -> None:
        """Pass ``job_no`` (0-based) of the job starts, with ``steps`` model evaluations."""
        with self._lock:
            self.job_no, self.step, self.steps = job_no, 0, steps
            self.skipped = False
            self._last_preview_step = -1

    def want_preview(self) -> None:
        """A client asked for the current image: make previews for a while."""
        self._preview_wanted_until = time.monotonic() + PREVIEW_INTEREST_S

    def callback(self, preview: Callable[[np.ndarray], list]) -> Callable[[int, int, np.ndarray, np.ndarray], bool]:
        """The pipeline step callback for this pass: records the step, renders a preview when one is wanted (every
        ``preview_every`` steps, with ``preview(denoised)``), and stops the loop on interrupt or skip."""

        def on_step(step: int, total: int, latents: np.ndarray, denoised: np.ndarray) -> bool:
            with self._lock:
                self.step, self.steps = step + 1, total
                due = step - self._last_preview_step >= self.preview_every or step + 1 == total
            if self.preview_every > 0 and due and time.monotonic() < self._preview_wanted_until:
                image = png_base64(preview(denoised[:1])[0])
                with self._lock:
                    self.preview = image
                    self.preview_id += 1
                    self._last_preview_step = step
            return self.interrupted or self.skipped

        return on_step

    def fraction(self) -> float:
        """The share of the whole job done, 0..1."""
        if not self.job_count:
            return 0.0
        within = self.step / self.steps if self.steps else 0.0
        return min(1.0, (self.job_no + within) / self.job_count)

    def snapshot(self, with_image: bool, queued: int) -> dict:
        """The progress as A1111's ``/sdapi/v1/progress`` answers it (plus ``queue``: jobs waiting)."""
        with self._lock:
            done = self.fraction()
            elapsed = time.monotonic() - self.started
            eta = elapsed / done - elapsed if done > 0 else 0.0
            return {
                "progress": done,
                "eta_relative": eta,
                "state": {
                    "skipped": self.skipped,
                    "interrupted": self.interrupted,
                    "stopping_generation": False,
                    "job": self.job,
                    "job_count": self.job_count,
                    "job_timestamp": self.timestamp,
                    "job_no": self.job_no,
                    "sampling_step": self.step,
                    "sampling_steps": self.steps,
                },
                "current_image": self.preview if with_image else None,
                "id_live_preview": self.preview_id,
                "textinfo": None,
                "current_task": self.task or None,
                "queue": queued,
            }


class Worker:
    """Runs submitted jobs one at a time in a background thread."""

    def __init__(self, max_queue: int, preview_every: int):
        self.max_queue = max_queue
        self.progress = Progress(preview_every)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.current: Job | None = None
        self._thread = threading.Thread(target=self._loop, name="sdlite-worker", daemon=True)

    def start(self) -> None:
        """Start the worker thread."""
        self._thread.start()

    def stop(self) -> None:
        """Let the running job end and stop the thread; jobs still queued fail."""
        self._queue.put(None)
        self._thread.join(timeout=60)

    @property
    def pending(self) -> int:
        """Jobs queued and not yet started."""
        return self._pending

    def submit(self, kind: str, run: Callable[[Progress], Any]) -> Job:
        """Queue ``run``; raises QueueFull when ``max_queue`` jobs already wait."""
        with self._lock:
            if self._pending >= self.max_queue:
                raise QueueFull(f"{self._pending} jobs are already waiting (at most {self.max_queue}); try again later")
            self._pending += 1
        job = Job(kind, run, id=f"task({next(self._ids)})")
        self._queue.put(job)
        return job

    def cancel(self, job: Job) -> None:
        """The client of ``job`` went away: drop it if it has not started, interrupt it if it runs."""
        job.cancelled = True
        if self.current is job:
            self.progress.interrupted = True

    def interrupt(self) -> None:
        """Stop the running job at its next step (A1111's interrupt)."""
        if self.current is not None:
            self.progress.interrupted = True

    def skip(self) -> None:
        """End the running pass at its next step and go on with the job's next one (A1111's skip)."""
        if self.current is not None:
            self.progress.skipped = True

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                break
            with self._lock:
                self._pending -= 1
            if job.cancelled:
                job.future.cancel()
                continue
            self.current = job
            self.progress.start(job)
            result, error = None, None
            try:
                result = job.run(self.progress)
            except BaseException as exc:  # the job's error belongs to its caller; the worker goes on
                error = exc
            # Idle before the caller hears of the result, so a progress poll right after it sees no job.
            self.current = None
            self.progress.finish()
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if job is not None:
                job.future.set_exception(RuntimeError("the server is shutting down"))
