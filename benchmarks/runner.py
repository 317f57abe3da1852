"""One benchmark configuration, run in a fresh process so that its memory figures are its own.

The parent writes a job file and starts ``python -m sdlite.benchmarks.runner JOB``; the child loads the
pipeline, runs a short warm-up generation (OpenVINO compiles for the shapes at the first call), then the
measured generation, and writes its figures to the job's result file and its image to a .npy file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sdlite.benchmarks.memory import PeakTracker, current_rss_mb
from sdlite.benchmarks.stages import StageObserver, Stages, summary

DEFAULT_PROMPT = "a red circle on a blue background"


@dataclass(frozen=True)
class Settings:
    """What every configuration of one benchmark run shares."""

    model: str
    width: int = 512
    height: int = 512
    steps: int = 20
    sampler: str | None = None
    seed: int = 1
    prompt: str = DEFAULT_PROMPT
    negative_prompt: str = ""
    cfg_scale: float = 7.5
    threads: int = 1
    warmup_steps: int = 2
    device: str = "CPU"
    # "taesd": sdlite decodes with the model's tiny VAE, and peers get the same decoder in place of their VAE's.
    vae: str = "full"


@dataclass(frozen=True)
class Config:
    """One sdlite configuration: engine, weight precision, arithmetic precision, memory mode."""

    engine: str = "onnx"
    precision: str | None = "fp32"
    compute: str = "auto"
    low_memory: bool = False
    # Another converted-model folder than the run's first one (bench -m A,B), or "" for that one.
    model: str = ""

    @property
    def label(self) -> str:
        """Short name for tables, e.g. ``openvino fp32 bf16 low-mem`` (``... [folder]`` for a second model)."""
        parts = [self.engine, self.precision or "default", self.compute]
        parts += ["low-mem"] if self.low_memory else []
        return " ".join(parts + ([f"[{Path(self.model).name}]"] if self.model else []))


@dataclass
class Job:
    """What the child process runs: ``kind`` is sdlite, soak or a peer's name; ``result`` is where it writes."""

    kind: str
    settings: Settings
    result: str
    config: Config | None = None
    soak: int = 0
    options: dict = field(default_factory=dict)

    def to_json(self) -> str:
        """The job as JSON (dataclasses flattened)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Job:
        """Inverse of :meth:`to_json`."""
        data = json.loads(text)
        data["settings"] = Settings(**data["settings"])
        data["config"] = Config(**data["config"]) if data.get("config") else None
        return cls(**data)


def instrument(pipe, stages: Stages) -> None:
    """Time ``pipe``'s stages through its part pool's observer hooks: each run of a part is a call of its
    stage, and loading a part (which a low-memory pipeline does inside the stage that needs it) is timed too
    (calls["load"])."""
    pipe.parts.observers.append(StageObserver(stages))


def _generate(pipe, settings: Settings, steps: int) -> np.ndarray:
    return pipe.txt2img(
        settings.prompt,
        negative_prompt=settings.negative_prompt,
        steps=steps,
        cfg_scale=settings.cfg_scale,
        sampler=settings.sampler,
        seed=settings.seed,
        width=settings.width,
        height=settings.height,
        output_type="np",
        progress=False,
    )[0]


def run_sdlite(job: Job) -> dict:
    """Load, warm up and time one generation of one sdlite configuration in this process."""
    from sdlite.pipeline import Pipeline

    settings, config = job.settings, job.config

    def load():
        pipe = Pipeline.load(
            config.model or settings.model,
            engine=config.engine,
            device=settings.device,
            precision=config.precision,
            low_memory=config.low_memory,
            threads=settings.threads,
            compute=config.compute,
            vae=settings.vae,
        )
        return pipe, {"compute": pipe.compute_precision}

    return measure(job, load, instrument, _generate)


def measure(job: Job, load: Callable, attach: Callable, generate: Callable) -> dict:
    """The measurement every pipeline gets, sdlite's or a peer's.

    ``load()`` -> (pipeline, {"compute": precision, optional "note"}) is timed as the load stage;
    ``attach(pipe, stages)`` wraps the pipeline's stages; ``generate(pipe, settings, steps)`` -> image
    (H, W, 3) in 0..1. A warm-up generation of ``settings.warmup_steps`` steps comes first (its memory is a
    stage of its own); then either one timed generation (its image saved next to the result file) or, for a
    soak job, ``job.soak`` generations."""
    settings = job.settings
    tracker = PeakTracker()
    stages = Stages(tracker)
    stages.enter("load")
    start = time.perf_counter()
    pipe, info = load()
    load_s = time.perf_counter() - start
    stages.finish()
    attach(pipe, stages)
    warmup_s, first_calls = None, {}
    if settings.warmup_steps:
        tracker.start("warmup")
        stages.track_memory = False
        start = time.perf_counter()
        generate(pipe, settings, settings.warmup_steps)
        warmup_s = time.perf_counter() - start
        first_calls = {name: calls[0] for name, calls in stages.calls.items() if calls}
        tracker.stop()
        stages.current, stages.track_memory = None, True
        stages.clear()
    common = {"status": "ok", **info, "load_s": load_s, "warmup_s": warmup_s}
    if job.soak:
        return common | _soak(pipe, settings, job.soak, generate) | {"peak_rss_mb": tracker.whole_mb}
    start = time.perf_counter()
    image = generate(pipe, settings, settings.steps)
    total_s = time.perf_counter() - start
    stages.finish()
    np.save(Path(job.result).with_suffix(".npy"), np.asarray(image, np.float32))
    return common | {
        "compile_s": _compile_seconds(first_calls, stages.calls) if first_calls else None,
        # Parts loaded during the generation (low-memory mode loads each part when it is needed).
        "load_in_generation_s": sum(stages.calls.get("load", [])),
        **summary(stages, total_s),
        "peak_rss_mb": tracker.whole_mb,
        "stage_peak_rss_mb": tracker.stages,
        "memory_method": tracker.method,
    }


def _compile_seconds(first: dict[str, float], warm: dict[str, list[float]]) -> float:
    """What the first call of each part cost beyond a warm call of it: OpenVINO compiles for the input shapes
    at the first call, onnxruntime allocates its arena. Both timings are measured; the difference is this."""
    excess = 0.0
    for name, seconds in first.items():
        if name != "load" and warm.get(name):
            excess += max(0.0, seconds - sorted(warm[name])[len(warm[name]) // 2])
    return excess


def _soak(pipe, settings: Settings, generations: int, generate: Callable) -> dict:
    """``generations`` generations in a row; the RSS after each shows growth a leak would cause."""
    rss, seconds = [], []
    for _ in range(generations):
        start = time.perf_counter()
        generate(pipe, settings, settings.steps)
        seconds.append(time.perf_counter() - start)
        rss.append(current_rss_mb())
    return {"generations": generations, "rss_mb": rss, "seconds": seconds}


def run_job(job: Job) -> dict:
    """Dispatch a job to its runner (sdlite, or a peer pipeline)."""
    if job.kind in ("sdlite", "soak"):
        return run_sdlite(job)
    from sdlite.benchmarks.peers import run_peer

    return run_peer(job)


def run_in_subprocess(job: Job, workdir: Path, timeout: float, env: dict[str, str] | None = None) -> dict:
    """Run ``job`` in a fresh Python process (with ``env`` added to the environment); a crash, a kill or a
    timeout becomes a failed result."""
    job_file = Path(job.result).with_suffix(".job.json")
    job_file.write_text(job.to_json())
    command = [sys.executable, "-m", "sdlite.benchmarks.runner", str(job_file)]
    try:
        environment = dict(os.environ, **(env or {}))
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=workdir, env=environment)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"timed out after {timeout:.0f} s"}
    result = Path(job.result)
    if result.is_file():
        return json.loads(result.read_text())
    lines = (done.stderr or done.stdout).strip().splitlines()
    # A process killed by a signal (e.g. the out-of-memory killer) has a negative return code.
    reason = f"killed by signal {-done.returncode}" if done.returncode < 0 else (lines[-1] if lines else "no output")
    return {"status": "failed", "reason": reason[:300]}


def main(argv: list[str] | None = None) -> int:
    """Child entry point: run the job file given as the only argument, write its result file."""
    from sdlite.errors import SdliteError, summarize

    argv = sys.argv[1:] if argv is None else argv
    job = Job.from_json(Path(argv[0]).read_text())
    try:
        result = run_job(job)
    except SdliteError as exc:
        result = {"status": "failed", "reason": str(exc)}
    except ImportError as exc:
        result = {"status": "skipped", "reason": f"{exc.name or exc} is not installed (pip install 'sdlite[bench]')"}
    except Exception as exc:  # any other failure of one configuration must not end the whole benchmark
        result = {"status": "failed", "reason": f"{type(exc).__name__}: {summarize(exc)}"}
    Path(job.result).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
