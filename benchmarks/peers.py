"""Peer pipelines on the same diffusers folder, size, steps, sampler, seed and threads as sdlite.

    python -m sdlite.benchmarks.peers --source DIFFUSERS_FOLDER [-m CONVERTED] [--size 512x512] [--steps 20]

Peers, each the pipeline class of the folder's family (SD 1.x/2.x or SDXL): diffusers on PyTorch CPU (fp32);
optimum-intel's ``OVDiffusionPipeline`` on its default export (fp32 weights, but int8 ones for parts over a billion
parameters: SDXL's U-Net) and on its int8-weight export, reshaped to static shapes, and the same pipeline on the
model folder's own fp16 OpenVINO IR (which optimum-intel loads as it is: no export, the same graphs sdlite's fp16
rows run); optimum's ``ORTDiffusionPipeline``. With ``--vae taesd`` every peer decodes with the model folder's
OpenVINO TAESD decoder in place of its VAE decoder, as FastSD CPU runs optimum-intel. Each runs in its own
process (see :mod:`sdlite.benchmarks.runner`), with its text encoders', U-Net's and VAE decoder's calls timed by
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
OV_DEFAULT = "optimum-openvino default"
OV_INT8 = "optimum-openvino int8"
ORT = "optimum-onnxruntime fp32"
OV_IR = "optimum-openvino fp16-ir"
PEERS = (DIFFUSERS, OV_DEFAULT, OV_INT8, ORT, OV_IR)
# The precision of the model folder's IR that OV_IR runs.
IR_PRECISION = "fp16"
# Peers that run an export of the folder, and which export.
EXPORTS = {OV_DEFAULT: "openvino", OV_INT8: "openvino-int8", ORT: "onnx"}


def _diffusers(folder: str, threads: int):
    import torch
    from diffusers import DiffusionPipeline

    torch.set_num_threads(threads)
    pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32, **_no_checker(folder))
    return pipe, {"compute": "f32"}


def _no_checker(folder: str) -> dict:
    """The keyword that leaves out a folder's safety checker, for pipelines that have one (sdlite's runs skip it)."""
    return {"safety_checker": None} if "safety_checker" in _model_index(folder) else {}


def _model_index(folder: str) -> dict:
    import json

    from sdlite.layout import MODEL_INDEX

    return json.loads((Path(folder) / MODEL_INDEX).read_text())


def _ort_class(folder: str):
    """optimum's onnxruntime pipeline for the folder's family (its auto class cannot export a local folder)."""
    from optimum.onnxruntime import ORTStableDiffusionPipeline, ORTStableDiffusionXLPipeline

    return ORTStableDiffusionXLPipeline if "text_encoder_2" in _model_index(folder) else ORTStableDiffusionPipeline


def _openvino(folder: str, threads: int, width: int, height: int, guided: bool = True):
    from optimum.intel import OVDiffusionPipeline

    from sdlite.engines.openvino import compute_precision
    from sdlite.errors import summarize

    def load():
        return OVDiffusionPipeline.from_pretrained(
            folder, compile=False, ov_config={"INFERENCE_NUM_THREADS": str(threads), "CACHE_DIR": ""}
        )

    info = {"compute": compute_precision("CPU", "auto")}
    pipe = load()
    try:
        # Static shapes, as optimum-intel's documentation recommends for speed. Its reshape gives the U-Net a
        # batch of 2 (the CFG pair); without guidance the batch stays dynamic and the sizes static.
        batch = 1 if guided else -1
        pipe.reshape(batch_size=batch, height=height, width=width, num_images_per_prompt=batch)
        if not guided:
            info["note"] = "static sizes, dynamic batch (optimum-intel's static reshape assumes a CFG pair)"
        pipe.compile()
    except RuntimeError as exc:
        # Some weight-compressed graphs fail static shape inference at small sizes; they run dynamic.
        pipe = load()
        pipe.compile()
        info["note"] = f"dynamic shapes (static reshape failed: {summarize(exc, 120)})"
    return pipe, info


def _onnxruntime(folder: str, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    pipe = _ort_class(folder).from_pretrained(folder, provider="CPUExecutionProvider", session_options=options)
    return pipe, {"compute": "f32"}


def load_peer(name: str, folder: str, threads: int, width: int, height: int, guided: bool = True):
    """(pipeline, {"compute": precision, "note": ...}) of peer ``name`` on ``folder`` (for optimum peers, the
    export of the diffusers folder)."""
    if name == DIFFUSERS:
        return _diffusers(folder, threads)
    if name in (OV_DEFAULT, OV_INT8, OV_IR):
        return _openvino(folder, threads, width, height, guided)
    if name == ORT:
        return _onnxruntime(folder, threads)
    raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")


def ir_view(model: Path, precision: str, out: Path) -> Path:
    """A folder in optimum-intel's layout whose parts are links to the ``precision`` OpenVINO IR of the converted
    model at ``model`` (each part's folder holds one precision at its top level, where optimum-intel looks)."""
    from sdlite.layout import CONFIG_NAME, MODEL_INDEX, SCHEDULER_CONFIG, TOKENIZER_2_DIR, TOKENIZER_DIR, family_parts
    from sdlite.model_folder import ModelFolder

    folder = ModelFolder.open(model)
    out.mkdir(parents=True)
    for name in (MODEL_INDEX, TOKENIZER_DIR, TOKENIZER_2_DIR, SCHEDULER_CONFIG.parent):
        if (folder.path / name).exists():
            (out / name).symlink_to((folder.path / name).resolve())
    for part in family_parts(folder.family):
        (out / part).mkdir()
        (out / part / CONFIG_NAME).symlink_to((folder.path / part / CONFIG_NAME).resolve())
        graph = folder.graph(part, ("openvino",), precision if part == "unet" else _near(folder, part, precision))
        for file in (graph, graph.with_suffix(".bin")):
            (out / part / file.name).symlink_to(file.resolve())
    return out


def _near(folder, part: str, precision: str) -> str | None:
    """``precision`` when ``part`` has it in OpenVINO, else None (the first held)."""
    return precision if any(v.precision == precision for v in folder.variants(part) if v.format == "openvino") else None


def taesd_decoder(model: str, threads: int):
    """The model folder's OpenVINO TAESD decoder (its fp16 variant) as a drop-in for a diffusers VAE's ``decode``
    (latents divided by the VAE's scaling factor in, images in -1..1 out): what FastSD CPU swaps into
    optimum-intel's pipelines; and the precision of the variant used."""
    import openvino as ov
    import torch

    from sdlite.layout import TINY_VAE_DECODER
    from sdlite.model_folder import ModelFolder

    folder = ModelFolder.open(model)
    wanted = folder.tiny_vae_precision(TINY_VAE_DECODER, ("openvino",), "fp16")  # None: the first held
    graph = folder.graph(TINY_VAE_DECODER, ("openvino",), wanted)
    precision = folder.variant(TINY_VAE_DECODER, ("openvino",), wanted).precision
    compiled = ov.Core().compile_model(str(graph), "CPU", {"INFERENCE_NUM_THREADS": str(threads)})

    def swap(pipe) -> None:
        scale = float(pipe.vae.config.scaling_factor)

        def decode(latents, *args, return_dict: bool = True, **kwargs):
            # TAESD decodes the U-Net's latents as they are: undo the pipeline's division by the VAE's scale.
            sample = torch.from_numpy(compiled({"latent_sample": (latents * scale).float().numpy()})[0].copy())
            return (sample,) if not return_dict else type("DecoderOutput", (), {"sample": sample})()

        pipe.vae.decode = decode

    return swap, precision


def _instrument(pipe, stages: Stages) -> None:
    """Time the peer's stages by wrapping its text encoders' and U-Net's forward and its VAE's decode."""
    for encoder in (getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2")):
        if encoder is not None:
            encoder.forward = stages.timed(TEXT_ENCODER, encoder.forward)
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
        guided = settings.cfg_scale > 1
        pipe, info = load_peer(
            job.kind, job.options["folder"], settings.threads, settings.width, settings.height, guided
        )
        pipe.set_progress_bar_config(disable=True)
        if settings.vae == "taesd":
            swap, precision = taesd_decoder(settings.model, settings.threads)
            swap(pipe)
            decoder = f"VAE decoder: OpenVINO TAESD {precision}"
            info["note"] = (info.get("note", "") + "; " if info.get("note") else "") + decoder
        return pipe, info

    return measure(job, load, _instrument, _generate) | {"folder": job.options["folder"]}


def export(kind: str, source: str, out: Path) -> dict:
    """Export the diffusers folder ``source`` the way optimum does for ``kind`` (onnx; openvino, optimum-intel's
    default; openvino-int8) into ``out``, atomically (a sibling temporary folder renamed at the end)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    if kind == "onnx":
        _ort_class(source).from_pretrained(source, export=True).save_pretrained(tmp)
    else:
        from optimum.intel import OVDiffusionPipeline, OVWeightQuantizationConfig

        quantization = OVWeightQuantizationConfig(bits=8) if kind == "openvino-int8" else None
        pipe = OVDiffusionPipeline.from_pretrained(source, export=True, compile=False, quantization_config=quantization)
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
