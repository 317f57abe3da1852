"""A mixed soak: N generations in one process, cycling modes, sizes and samplers, watching for leaks.

    python -m sdlite.benchmarks.soak [-m MODEL] [-n 200] [--engine onnx] [--steps 4]

Each generation is one of txt2img, img2img, inpaint and outpaint, at one of three sizes, with one of several
samplers (two-evaluation and stochastic ones included). After each, the resident set (VmRSS), the open file
descriptors and the threads are read. Growth is measured from the end of the first cycle through every mode,
size and sampler (allocators and engines warm up then) to the last generation: RSS drift in percent, file
descriptors and threads as counts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from sdlite.benchmarks.hardware import hardware
from sdlite.benchmarks.memory import current_rss_mb

MODES = ("txt2img", "img2img", "inpaint", "outpaint")
SAMPLERS = ("Euler a", "DPM++ 2M Karras", "Heun", "DPM++ SDE", "DDIM", "UniPC", "LMS")


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd")) if Path("/proc/self/fd").is_dir() else -1


def _threads() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return -1


def _inputs(size: tuple[int, int]) -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(size[0] * 7 + size[1])
    image = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[size[1] // 4 : size[1] * 3 // 4, size[0] // 4 : size[0] * 3 // 4] = 255
    return image, Image.fromarray(mask)


def generate(pipe, mode: str, size: tuple[int, int], sampler: str, seed: int, steps: int) -> None:
    """One generation of ``mode`` at ``size`` (outpainting grows a ``size`` image by 16 pixels on the right)."""
    options = {"steps": steps, "sampler": sampler, "seed": seed, "progress": False, "output_type": "np"}
    prompt = "a red circle on a blue background"
    if mode == "txt2img":
        pipe.txt2img(prompt, width=size[0], height=size[1], **options)
        return
    image, mask = _inputs(size)
    if mode == "img2img":
        pipe.img2img(prompt, image, strength=0.6, **options)
    elif mode == "inpaint":
        pipe.inpaint(prompt, image, mask, **options)
    else:
        pipe.outpaint(prompt, image, extend=(0, 0, 16, 0), **options)


def main(argv: list[str] | None = None) -> int:
    """Run the soak and print its figures."""
    from sdlite import Pipeline
    from sdlite.models import default_model_path

    parser = argparse.ArgumentParser(prog="python -m sdlite.benchmarks.soak", description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", help="converted-model folder (default: the packaged model)")
    parser.add_argument("-n", "--generations", type=int, default=200)
    parser.add_argument("--engine", default="onnx")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    pipe = Pipeline.load(args.model or default_model_path(), engine=args.engine)
    base = pipe.default_size
    sizes = (base, (base[0] + 32, base[1]), (base[0] + 64, base[1] + 64))
    # Modes, sizes and samplers cycle at co-prime periods (4, 3, 7): the first 84 generations cover every
    # combination once.
    warm = len(MODES) * len(sizes) * len(SAMPLERS)
    records = []
    start = time.perf_counter()
    for i in tqdm(range(args.generations), desc="soak", disable=args.quiet):
        mode, size, sampler = MODES[i % len(MODES)], sizes[i % len(sizes)], SAMPLERS[i % len(SAMPLERS)]
        generate(pipe, mode, size, sampler, seed=i, steps=args.steps)
        records.append((current_rss_mb(), _open_files(), _threads()))
    seconds = time.perf_counter() - start
    first = records[min(warm, len(records)) - 1]
    last = records[-1]
    print(f"machine: {hardware().get('cpu', 'unknown CPU')}")
    print(f"{args.generations} generations ({', '.join(MODES)}; sizes {', '.join(f'{w}x{h}' for w, h in sizes)};")
    print(f"  samplers {', '.join(SAMPLERS)}; {args.steps} steps; {args.engine}) in {seconds:.1f} s")
    print(
        f"RSS after generation {min(warm, len(records))}: {first[0]:.1f} MiB, after {len(records)}: {last[0]:.1f} MiB"
    )
    print(f"RSS drift: {100 * (last[0] - first[0]) / first[0]:+.2f} %  (peak {max(r[0] for r in records):.1f} MiB)")
    print(f"open files: {first[1]} -> {last[1]}   threads: {first[2]} -> {last[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
