"""Fidelity of every format x precision x compute variant on the shapes model: PSNR against the fp32
reference images of the same seeds, and the judge's scores.

    sdlite convert SHAPES_SRC out/shapes-all --format both --precision fp32,fp16,int8,w8a8
    python -m sdlite.benchmarks.precision_eval -m out/shapes-all --prompts 200
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from sdlite import Pipeline
from sdlite.benchmarks.fidelity import psnr
from sdlite.benchmarks.shapes_eval import evaluate
from sdlite.errors import InputError
from sdlite.models.shapes_data import eval_prompts

VARIANTS = [
    ("onnx", "fp32", "f32"),
    ("onnx", "fp16", "f32"),
    ("onnx", "int8", "f32"),
    ("openvino", "fp32", "f32"),
    ("openvino", "fp32", "bf16"),
    ("openvino", "fp16", "bf16"),
    ("openvino", "int8", "f32"),
    ("openvino", "int8", "bf16"),
    ("openvino", "w8a8", "bf16"),
]


def main(argv: list[str] | None = None) -> int:
    """Print the table (markdown)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", required=True, help="a folder holding several variants")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=7.5)
    args = parser.parse_args(argv)
    prompts = eval_prompts(args.prompts)
    print(f"{args.model}: {len(prompts)} prompts, {args.steps} steps, CFG {args.cfg}, the model's own sampler")
    print("| engine | weights | compute | PSNR vs fp32 (dB) | shape colour | background | shape |")
    print("|---|---|---|---|---|---|---|")
    reference = None
    for engine, precision, compute in VARIANTS:
        try:
            pipe = Pipeline.load(args.model, engine=engine, precision=precision, compute=compute)
        except InputError as exc:
            print(f"| {engine} | {precision} | {compute} | skipped: {exc} | | | |")
            continue
        scores, images, _ = evaluate(pipe, prompts, pipe.default_sampler, args.steps, args.cfg, 0)
        pixels = np.stack([np.asarray(im, dtype=np.float32) / 255 for im in images])
        reference = pixels if reference is None else reference
        s = scores["all"]
        print(
            f"| {engine} | {precision} | {compute} | {psnr(pixels, reference):.1f} | {s['colour']:.1%} | "
            f"{s['background']:.1%} | {s['shape']:.1%} |"
        )
        sys.stdout.flush()
        pipe.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
