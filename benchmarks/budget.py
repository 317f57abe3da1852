"""Generations in one process under a memory policy: the seconds of each and the process's peak RSS.

    python -m sdlite.benchmarks.budget -m MODEL --precision w8a8 --policy none|low|GIB [--size 256x256]

Shows what the part pool's budget buys: with no budget every part stays loaded; ``low`` (a budget of 0) loads
each part when it runs; a budget in GiB keeps what fits. Run each policy in its own process (the peak is the
process's).
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

from sdlite.benchmarks.hardware import hardware


def main(argv: list[str] | None = None) -> int:
    """Run the generations and print one line of figures."""
    from sdlite import Pipeline
    from sdlite.cli import parse_size

    parser = argparse.ArgumentParser(prog="python -m sdlite.benchmarks.budget", description=__doc__.splitlines()[0])
    parser.add_argument("-m", "--model", required=True)
    parser.add_argument("--policy", default="none", help="none, low, or a budget in GiB")
    parser.add_argument("--engine", default="openvino")
    parser.add_argument("--precision")
    parser.add_argument("--size", type=parse_size, default=(256, 256))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--generations", type=int, default=3)
    args = parser.parse_args(argv)
    policy = {"none": {}, "low": {"low_memory": True}}.get(args.policy)
    if policy is None:
        policy = {"memory_budget": float(args.policy)}
    start = time.perf_counter()
    pipe = Pipeline.load(args.model, engine=args.engine, precision=args.precision, safety_checker=False, **policy)
    load = time.perf_counter() - start
    seconds = []
    for seed in range(args.generations):
        start = time.perf_counter()
        width, height = args.size
        pipe.txt2img("a red circle", steps=args.steps, seed=seed, width=width, height=height, progress=False)
        seconds.append(time.perf_counter() - start)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    timings = " ".join(f"{s:.2f}" for s in seconds)
    cpu = hardware().get("cpu")
    print(f"{cpu}: policy {args.policy}: load {load:.2f} s, generations {timings} s, peak {peak_mib:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
