"""The machine's arithmetic limit: measured throughput of one large square matrix product.

    python -m sdlite.benchmarks.gemm [--size 4096] [--threads N]

numpy (whatever BLAS it ships) in float32, and OpenVINO's CPU MatMul with f32 and bf16 inference precision,
each on ``threads`` threads; the best of a few repeats counts (2 n^3 FLOPs per product). It runs in its own
process because BLAS reads its thread count from the environment when numpy is imported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

REPEATS = 3
_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def _best_seconds(run, repeats: int) -> float:
    run()  # warm-up: first-touch page faults and thread-pool start are not throughput
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def numpy_gflops(n: int, repeats: int = REPEATS) -> float:
    """float32 n x n x n product with numpy's BLAS, in GFLOP/s."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)
    out = np.empty((n, n), np.float32)
    return 2 * n**3 / _best_seconds(lambda: np.matmul(a, b, out=out), repeats) / 1e9


def openvino_gflops(n: int, precision: str, threads: int, repeats: int = REPEATS) -> float:
    """One n x n x n MatMul compiled by OpenVINO's CPU plugin with ``precision`` (f32, bf16), in GFLOP/s.

    The second operand is a constant, as weights are in a network, so the plugin may repack it once."""
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    a = ops.parameter([n, n], np.float32, name="a")
    weights = ops.constant(rng.standard_normal((n, n), np.float32))
    model = ov.Model([ops.matmul(a, weights, False, False)], [a], "gemm")
    config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": str(threads)}
    request = ov.Core().compile_model(model, "CPU", config).create_infer_request()
    x = rng.standard_normal((n, n), np.float32)
    return 2 * n**3 / _best_seconds(lambda: request.infer({0: x}), repeats) / 1e9


def measure(n: int, threads: int) -> dict:
    """Every GEMM this process can run; a kind that fails is recorded with its error instead."""
    results: dict[str, float | str] = {}
    kinds = {
        "numpy f32": lambda: numpy_gflops(n),
        "openvino f32": lambda: openvino_gflops(n, "f32", threads),
        "openvino bf16": lambda: openvino_gflops(n, "bf16", threads),
    }
    for name, run in kinds.items():
        try:
            results[name] = round(run(), 1)
        except Exception as exc:  # e.g. a CPU without bf16 support: the other kinds still count
            results[name] = f"failed: {exc}"
    return {"size": n, "threads": threads, "gflops": results}


def measure_in_subprocess(n: int, threads: int, timeout: float = 600) -> dict:
    """``measure`` in a fresh process with BLAS limited to ``threads`` threads."""
    env = dict(os.environ, **{name: str(threads) for name in _THREAD_VARIABLES})
    command = [sys.executable, "-m", "sdlite.benchmarks.gemm", "--size", str(n), "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"size": n, "threads": threads, "gflops": {}, "error": tail}
    return json.loads(done.stdout.strip().splitlines()[-1])


def best_gflops(gemm: dict, compute: str) -> float | None:
    """The best measured throughput usable at ``compute`` precision: f32 kinds for f32, any kind for the
    rest (bf16 and lower-precision arithmetic can use the bf16 units)."""
    values = [
        v for k, v in gemm.get("gflops", {}).items() if isinstance(v, float | int) and (compute != "f32" or "f32" in k)
    ]
    return max(values) if values else None


def main(argv: list[str] | None = None) -> int:
    """Print the measurement as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.size, args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
