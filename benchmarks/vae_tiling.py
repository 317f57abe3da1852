"""Tiled vs untiled VAE decoding: peak memory, time and the difference tiling makes (PSNR).

    python -m sdlite.benchmarks.vae_tiling -m out/sd15 --size 1024x1024

Each configuration runs in a fresh subprocess so that its peak RSS (getrusage's ru_maxrss) is its own.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sdlite.engines import load_engine
from sdlite.model_folder import ModelFolder
from sdlite.rng import randn
from sdlite.vae import Vae


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(model: str, width: int, height: int, tiling: str, out: str) -> None:
    """Decode one random latent in this process and print its figures as JSON."""
    folder = ModelFolder.open(model)
    engine = load_engine(folder.graph("vae_decoder", ("onnx",)))
    loaded_mb = _peak_rss_mb()
    vae = Vae(lambda name: engine, folder.manifest.vae_scaling_factor, tiling=tiling)
    latents = randn((1, 4, height // 8, width // 8), seed=0) * 0.18215 * 5
    start = time.perf_counter()
    image = vae.decode(latents)
    seconds = time.perf_counter() - start
    np.save(out, image)
    print(json.dumps({"tiling": tiling, "seconds": seconds, "loaded_mb": loaded_mb, "peak_mb": _peak_rss_mb()}))


def main(argv: list[str] | None = None) -> int:
    """Run untiled and tiled decoding in subprocesses and print a table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", required=True, help="converted-model folder")
    parser.add_argument("--size", default="1024x1024")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    if args.child:
        child(args.model, width, height, args.child, args.out)
        return 0
    results, images = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for tiling in ("off", "on"):
            out = str(Path(tmp) / f"{tiling}.npy")
            command = [
                sys.executable,
                "-m",
                "sdlite.benchmarks.vae_tiling",
                "-m",
                args.model,
                "--size",
                args.size,
                "--child",
                tiling,
                "--out",
                out,
            ]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            images[tiling] = np.load(out)
    mse = float(np.mean((images["on"] - images["off"]) ** 2))
    psnr = 10 * np.log10(1.0 / mse) if mse else float("inf")
    print(f"VAE decode {args.size}, {Path(args.model).name}")
    print("| tiling | decode s | RSS after load MB | peak RSS MB | decode working set MB |")
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['tiling']} | {r['seconds']:.1f} | {r['loaded_mb']:.0f} | {r['peak_mb']:.0f} | "
            f"{r['peak_mb'] - r['loaded_mb']:.0f} |"
        )
    off, on = results
    ratio = (off["peak_mb"] - off["loaded_mb"]) / max(on["peak_mb"] - on["loaded_mb"], 1)
    print(
        f"working set untiled / tiled: {ratio:.1f}x; peak RSS {off['peak_mb'] / on['peak_mb']:.1f}x; "
        f"PSNR tiled vs untiled: {psnr:.1f} dB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
