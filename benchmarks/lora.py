"""What LoRAs applied at run time cost: U-Net step time, peak memory, and the time to change them.

    python -m sdlite.benchmarks.lora -m MODEL --engine openvino --precision w8a8 [--low-memory] [--rank 32]

Writes three random LoRAs of the given rank in kohya's usual layout (every attention and feed-forward linear and
``proj_in``/``proj_out`` of the U-Net, every attention and MLP linear of the text encoder; float16, as trained
LoRAs are shared), then runs one process per configuration (no LoRA, one, three) so that each peak resident set
is its own: a warm-up generation (compilation, the graph update), then a timed one. Prints the median U-Net step,
its ratio to the step without LoRAs, the process's peak RSS and what the LoRAs added to it against the files'
size, the graph update a new set of LoRAs costs (the parts reloaded with their branches) and what changing only a
multiplier costs (no part reloads).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sdlite.benchmarks.hardware import hardware
from sdlite.benchmarks.memory import max_rss_mb
from sdlite.benchmarks.previews import UNetTimer

# kohya's default targets ("LoRA-LierLa"): the transformer blocks' linears and 1x1 projections, the text encoder's.
_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
CONFIGS = {"none": "", "one": "<lora:bench0:0.8>", "three": "<lora:bench0:0.8> <lora:bench1:0.5> <lora:bench2:0.3>"}


def _float_graph(opened, part: str) -> Path:
    """``part``'s fp32 graph, or its fp16 one in a folder converted without fp32 (same layers, same shapes)."""
    held = {variant.precision for variant in opened.variants(part)}
    return opened.graph(part, ("onnx", "openvino"), "fp16" if "fp16" in held and "fp32" not in held else "fp32")


def write_loras(model: Path, folder: Path, rank: int, count: int = 3) -> list[Path]:
    """``count`` random rank-``rank`` LoRAs for the model at ``model`` (layers read from its fp32 or fp16 graphs), as
    ``bench0.safetensors``...; returns their paths."""
    from safetensors.numpy import save_file

    from sdlite.lora_graph import graph_layers
    from sdlite.model_folder import ModelFolder

    opened = ModelFolder.open(model)
    layers = {
        prefix: {
            path: shape
            for path, shape in graph_layers(_float_graph(opened, part), part).items()
            if path.endswith(targets)
        }
        for part, prefix, targets in (("unet", "lora_unet_", _TARGETS), ("text_encoder", "lora_te_", _TEXT_TARGETS))
    }
    paths = []
    rng = np.random.default_rng(0)
    for index in range(count):
        state = {}
        for prefix, shapes in layers.items():
            for path, (_, in_features, out_features, kernel) in shapes.items():
                key = prefix + path.replace(".", "_")
                ones = (1,) * len(kernel)
                down = rng.standard_normal((rank, in_features, *ones), np.float32) / np.sqrt(in_features)
                up = rng.standard_normal((out_features, rank, *ones), np.float32) * 0.01
                state[f"{key}.lora_down.weight"] = down.astype(np.float16)
                state[f"{key}.lora_up.weight"] = up.astype(np.float16)
                state[f"{key}.alpha"] = np.array(rank / 2, np.float16)
        paths.append(folder / f"bench{index}.safetensors")
        save_file(state, str(paths[-1]))
    return paths


def _child(args: argparse.Namespace) -> dict:
    """One configuration in this process: warm-up, timed generation; for "one", a multiplier change too."""
    from sdlite.pipeline import Pipeline

    pipe = Pipeline.load(
        args.model,
        engine=args.engine,
        precision=args.precision,
        low_memory=args.low_memory,
        lora_dir=args.lora_dir,
        safety_checker=False,
    )
    timer = UNetTimer()
    loads: list[str] = []

    class Loads:
        def after(self, part: str, action: str, seconds: float) -> None:
            if action == "load":
                loads.append(part)

    pipe.parts.observers += [timer, Loads()]
    width, height = args.size
    options = dict(steps=args.steps, seed=1, width=width, height=height, progress=False)
    tags = CONFIGS[args.child]

    def timed(prompt: str) -> tuple[float, int]:
        """Seconds of one generation and the parts it loaded."""
        loads.clear()
        start = time.perf_counter()
        pipe.txt2img(prompt, **options)
        return time.perf_counter() - start, len(loads)

    if args.child == "three":
        pipe.txt2img(f"{args.prompt} {CONFIGS['one']}", **options)
    # The first generation with this set: compilation, and (after "one") the graph update.
    switched, _ = timed(f"{args.prompt} {tags}")
    updates = dict(pipe.loras.updates)
    timer.ms.clear()
    seconds, loaded = timed(f"{args.prompt} {tags}")
    result = {"step_ms": statistics.median(timer.ms), "peak_mb": max_rss_mb(), "updates_s": updates, "seconds": seconds}
    result["switch_s"] = switched - seconds
    if args.child == "one":
        changed, changed_loaded = timed(f"{args.prompt} <lora:bench0:0.3>")
        # Against the same generation with the multiplier unchanged (--low-memory reloads every part each time).
        result["multiplier_change"] = {"seconds": changed - seconds, "reloads": changed_loaded - loaded}
    return result


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, measure each configuration in its own process, print the table."""
    from sdlite.cli import parse_size

    parser = argparse.ArgumentParser(prog="python -m sdlite.benchmarks.lora", description=__doc__)
    parser.add_argument("-m", "--model", required=True, help="converted-model folder with fp32 or fp16 graphs")
    parser.add_argument("--engine", default="openvino")
    parser.add_argument("--precision")
    parser.add_argument("--low-memory", action="store_true")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--size", type=parse_size, default=(512, 512))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompt", default="a castle on a hill, watercolor")
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--lora-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args)))
        return 0
    with tempfile.TemporaryDirectory(prefix="sdlite-lora-bench-") as folder:
        paths = write_loras(Path(args.model), Path(folder), args.rank)
        file_mb = [path.stat().st_size / (1 << 20) for path in paths]
        results = {}
        for config in CONFIGS:
            command = [sys.executable, "-m", "sdlite.benchmarks.lora", *(argv or sys.argv[1:])]
            command += ["--child", config, "--lora-dir", folder]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode:
                print(done.stderr, file=sys.stderr)
                return done.returncode
            results[config] = json.loads(done.stdout.strip().splitlines()[-1])
    machine = hardware()
    mode = " --low-memory" if args.low_memory else ""
    print(
        f"{machine.get('cpu')}; {args.engine} {args.precision or 'default'}{mode}; {args.size[0]}x{args.size[1]}, "
        f"rank {args.rank}, LoRA files {file_mb[0]:.1f} MiB each"
    )
    base = results["none"]
    print("| LoRAs | U-Net step (ms) | vs none | generation (s) | peak RSS (MiB) | added (MiB) | added / files |")
    print("|---|---|---|---|---|---|---|")
    for config, count in (("none", 0), ("one", 1), ("three", 3)):
        row = results[config]
        added = row["peak_mb"] - base["peak_mb"]
        per_file = f"{added / sum(file_mb[:count]):.2f}" if count else ""
        print(
            f"| {config} | {row['step_ms']:.0f} | {row['step_ms'] / base['step_ms']:.3f} | {row['seconds']:.1f} "
            f"| {row['peak_mb']:.0f} "
            f"| {added:+.0f} | {per_file} |"
        )
    three = results["three"]
    change = results["one"]["multiplier_change"]
    parts = ", ".join(f"{part} {seconds:.2f} s" for part, seconds in three["updates_s"].items())
    print(
        f"graph update (one LoRA -> three): {three['switch_s']:+.2f} s on that generation ({parts} to load, edit, run)"
    )
    print(f"multiplier change: {change['reloads']} more part loads, {change['seconds']:+.2f} s against no change")
    return 0


if __name__ == "__main__":
    sys.exit(main())
