"""Peer pipelines on the same diffusers folder, size, steps, sampler, seed and threads as sdlite.

    python -m sdlite.benchmarks.peers --source DIFFUSERS_FOLDER [-m CONVERTED] [--size 512x512] [--steps 20]

Peers: diffusers on PyTorch CPU (fp32); optimum-intel's ``OVStableDiffusionPipeline`` with fp32 weights and
with int8 weights, reshaped to static shapes; optimum's ``ORTStableDiffusionPipeline``. Each runs in its own
process (see :mod:`sdlite.benchmarks.runner`), with its text encoder, U-Net and VAE decoder calls timed by
wrapping them, so the figures are measured exactly as sdlite's are. The optimum peers need their own export
of the folder; it is made once (in a subprocess of its own, so it does not count in the peer's memory) and
cached. Needs the ``bench`` extra.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from sdlite.benchmarks.stages import TEXT_ENCODER, UNET, VAE_DECODER, Stages

DIFFUSERS = "diffusers-torch fp32"
OV_FP32 = "optimum-openvino fp32"
OV_INT8 = "optimum-openvino int8"
ORT = "optimum-onnxruntime fp32"
PEERS = (DIFFUSERS, OV_FP32, OV_INT8, ORT)
# Peers that run an export of the folder, and which export.
EXPORTS = {OV_FP32: "openvino-fp32", OV_INT8: "openvino-int8", ORT: "onnx"}


def _diffusers(folder: str, threads: int):
    import torch
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(threads)
    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, safety_checker=None)
    return pipe, {"compute": "f32"}


def _openvino(folder: str, threads: int, width: int, height: int):
    from optimum.intel import OVStableDiffusionPipeline

    from sdlite.engines.openvino import compute_precision
    from sdlite.errors import summarize

    def load():
        return OVStableDiffusionPipeline.from_pretrained(
            folder, compile=False, ov_config={"INFERENCE_NUM_THREADS": str(threads), "CACHE_DIR": ""}
        )

    info = {"compute": compute_precision("CPU", "auto")}
    pipe = load()
    try:
        # Static shapes, as optimum-intel's documentation recommends for speed.
        pipe.reshape(batch_size=1, height=height, width=width, num_images_per_prompt=1)
        pipe.compile()
    except RuntimeError as exc:
        # Some weight-compressed graphs fail static shape inference at small sizes; they run dynamic.
        pipe = load()
        pipe.compile()
        info["note"] = f"dynamic shapes (static reshape failed: {summarize(exc, 120)})"
    return pipe, info


def _onnxruntime(folder: str, threads: int):
    import onnxruntime
    from optimum.onnxruntime import ORTStableDiffusionPipeline

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    pipe = ORTStableDiffusionPipeline.from_pretrained(folder, provider="CPUExecutionProvider", session_options=options)
    return pipe, {"compute": "f32"}


def load_peer(name: str, folder: str, threads: int, width: int, height: int):
    """(pipeline, {"compute": precision, "note": ...}) of peer ``name`` on ``folder`` (for optimum peers, the
    export of the diffusers folder)."""
    if name == DIFFUSERS:
        return _diffusers(folder, threads)
    if name in (OV_FP32, OV_INT8):
        return _openvino(folder, threads, width, height)
    if name == ORT:
        return _onnxruntime(folder, threads)
    raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")


def _instrument(pipe, stages: Stages) -> None:
    """Time the peer's stages by wrapping its text encoder's and U-Net's forward and its VAE's decode."""
    pipe.text_encoder.forward = stages.timed(TEXT_ENCODER, pipe.text_encoder.forward)
    pipe.unet.forward = stages.timed(UNET, pipe.unet.forward)
    pipe.vae.decode = stages.timed(VAE_DECODER, pipe.vae.decode)


def _generate(pipe, settings, steps: int) -> np.ndarray:
    import torch

    # A CPU torch generator seeded like sdlite's default seed source gives both the same initial noise.
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    result = pipe(
        settings.prompt,
        negative_prompt=settings.negative_prompt or None,
        num_inference_steps=steps,
        guidance_scale=settings.cfg_scale,
        width=settings.width,
        height=settings.height,
        generator=generator,
        output_type="np",
    )
    return np.asarray(result.images[0], np.float32)


def run_peer(job) -> dict:
    """Time one generation of peer ``job.kind`` in this process, as sdlite's are (runner.measure); or, for
    ``export:KIND`` jobs, make that export."""
    from sdlite.benchmarks.runner import measure

    if job.kind.startswith("export:"):
        return export(job.kind.split(":", 1)[1], job.options["source"], Path(job.options["out"]))
    settings = job.settings

    def load():
        pipe, info = load_peer(job.kind, job.options["folder"], settings.threads, settings.width, settings.height)
        pipe.set_progress_bar_config(disable=True)
        return pipe, info

    return measure(job, load, _instrument, _generate) | {"folder": job.options["folder"]}


def export(kind: str, source: str, out: Path) -> dict:
    """Export the diffusers folder ``source`` the way optimum does for ``kind`` (onnx, openvino-fp32,
    openvino-int8) into ``out``, atomically (a sibling temporary folder renamed at the end)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    if kind == "onnx":
        from optimum.onnxruntime import ORTStableDiffusionPipeline

        ORTStableDiffusionPipeline.from_pretrained(source, export=True).save_pretrained(tmp)
    else:
        from optimum.intel import OVStableDiffusionPipeline, OVWeightQuantizationConfig

        quantization = OVWeightQuantizationConfig(bits=8) if kind == "openvino-int8" else None
        pipe = OVStableDiffusionPipeline.from_pretrained(
            source, export=True, compile=False, quantization_config=quantization
        )
        pipe.save_pretrained(tmp)
    tmp.rename(out)
    return {"status": "ok", "export_s": time.perf_counter() - start}


def export_cache_dir(source: str | Path, kind: str, root: Path) -> Path:
    """Where the export ``kind`` of ``source`` is cached: keyed by the folder's path and its U-Net weights'
    size and modification time, so a rebuilt folder is exported again."""
    source = Path(source).resolve()
    stamp = [str(source)]
    for weights in sorted((source / "unet").glob("*")):
        info = weights.stat()
        stamp.append(f"{weights.name}:{info.st_size}:{info.st_mtime_ns}")
    key = hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:16]
    return root / f"{source.name}-{key}" / kind


def default_cache_root() -> Path:
    """``$SDLITE_CACHE/peers`` or ``~/.cache/sdlite/peers``."""
    root = os.environ.get("SDLITE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sdlite")
    return Path(root) / "peers"


def main(argv: list[str] | None = None) -> int:
    """``python -m sdlite.benchmarks.peers``: ``sdlite bench --peers`` under another name."""
    from sdlite.benchmarks.cli import run_main

    return run_main(["--peers", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
