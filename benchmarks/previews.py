"""What progress previews cost and how close they come to the final image.

    python -m sdlite.benchmarks.previews [-m MODEL] [--size 512x512] [--steps 8] [--engine openvino] ...

One generation with a preview decoded after every step (through the step callback, as ``--preview-every 1`` and
the server do): prints the U-Net step time, the preview's decode time and their ratio, and each preview's PSNR
against the final image. Previews use the model's tiny VAE (TAESD) when it has one, else its VAE.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from sdlite.benchmarks.fidelity import psnr
from sdlite.images import to_unit


class UNetTimer:
    """A part-pool observer that keeps the U-Net's run times."""

    def __init__(self) -> None:
        self.ms: list[float] = []

    def after(self, part: str, action: str, seconds: float) -> None:
        """Keep a U-Net run's milliseconds."""
        if part == "unet" and action == "run":
            self.ms.append(seconds * 1000)


def measure(pipe, prompt: str, steps: int, seed: int, size: tuple[int, int] | None, cfg: float | None) -> dict:
    """Step and preview times (ms) of one generation, and every preview's PSNR (dB) against the final image."""
    timer = UNetTimer()
    pipe.parts.observers.append(timer)
    previews, preview_ms = [], []

    def callback(step: int, total: int, latents: np.ndarray, denoised: np.ndarray) -> None:
        start = time.perf_counter()
        preview = pipe.preview(denoised[:1])[0]
        preview_ms.append((time.perf_counter() - start) * 1000)
        previews.append(to_unit(preview))

    width, height = size or (None, None)
    options = dict(steps=steps, seed=seed, width=width, height=height, cfg_scale=cfg, progress=False)
    pipe.txt2img(prompt, **options)  # warm-up: OpenVINO compiles at the first call
    timer.ms.clear()
    final = pipe.txt2img(prompt, callback=callback, output_type="np", **options)[0]
    return {
        "unet_step_ms": statistics.median(timer.ms),
        "preview_ms": statistics.median(preview_ms),
        "psnr_db": [psnr(preview, final) for preview in previews],
    }


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, measure, print."""
    from sdlite.cli import _default_model, parse_size
    from sdlite.errors import InputError
    from sdlite.pipeline import Pipeline

    parser = argparse.ArgumentParser(prog="python -m sdlite.benchmarks.previews", description=__doc__)
    parser.add_argument("-m", "--model", help="converted-model folder (default: the packaged model)")
    parser.add_argument("--prompt", default="a red circle on a blue background")
    parser.add_argument("--size", type=parse_size)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--cfg", type=float)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--engine", default="onnx")
    parser.add_argument("--precision")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    try:
        pipe = Pipeline.load(
            args.model or _default_model(), engine=args.engine, precision=args.precision, threads=args.threads
        )
        result = measure(pipe, args.prompt, args.steps, args.seed, args.size, args.cfg)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    graph = pipe.parts.path(pipe.preview_codec.decoder_part).relative_to(pipe.folder.path)
    print(f"model {pipe.folder.manifest.name}, previews decoded by {graph}")
    print(
        f"U-Net step {result['unet_step_ms']:.1f} ms, preview {result['preview_ms']:.1f} ms (medians): "
        f"preview / step = {result['preview_ms'] / result['unet_step_ms']:.3f}"
    )
    print(
        "PSNR of each step's preview against the final image (dB): "
        + ", ".join(f"{value:.1f}" for value in result["psnr_db"])
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
