"""What the machine is: CPU, instruction sets, memory, OS, the devices each engine sees, library versions."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path

# /proc/cpuinfo flag -> the name reports use. VNNI and BF16 exist as AVX-512 and AVX (VEX) forms.
ISA_FLAGS = {
    "avx2": "AVX2",
    "fma": "FMA",
    "avx512f": "AVX-512",
    "avx512_vnni": "AVX512-VNNI",
    "avx_vnni": "AVX-VNNI",
    "avx512_bf16": "AVX512-BF16",
    "avx512_fp16": "AVX512-FP16",
    "amx_tile": "AMX",
    "amx_bf16": "AMX-BF16",
    "amx_int8": "AMX-INT8",
    "neon": "NEON",
    "asimd": "NEON",
    "sve": "SVE",
}


def _cpuinfo() -> tuple[str, set[str]]:
    """(model name, flags) from /proc/cpuinfo; ('', set()) where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "", set()
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, flags


def _physical_cores() -> int | None:
    """Distinct (package, core) pairs the kernel lists; None where it does not."""
    cores = set()
    for cpu in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
        try:
            cores.add(((cpu / "physical_package_id").read_text(), (cpu / "core_id").read_text()))
        except OSError:
            continue
    return len(cores) or None


def _ram_gb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def engine_devices() -> dict[str, list[str]]:
    """The devices OpenVINO sees (with their full names) and onnxruntime's execution providers."""
    devices: dict[str, list[str]] = {}
    try:
        from sdlite.engines.openvino import core

        devices["openvino"] = [
            f"{name}: {core().get_property(name, 'FULL_DEVICE_NAME')}" for name in core().available_devices
        ]
    except Exception as exc:  # a broken plugin must not stop a benchmark report
        devices["openvino"] = [f"unavailable ({exc})"]
    try:
        import onnxruntime

        devices["onnxruntime"] = list(onnxruntime.get_available_providers())
    except Exception as exc:
        devices["onnxruntime"] = [f"unavailable ({exc})"]
    return devices


def hardware() -> dict:
    """A JSON-ready description of this machine and software."""
    model, flags = _cpuinfo()
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": model or platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "physical_cores": _physical_cores(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "isa": sorted({name for flag, name in ISA_FLAGS.items() if flag in flags}),
        "ram_gb": round(_ram_gb(), 1) if _ram_gb() else None,
        "os": f"{platform.system()} {platform.release()}",
        "hostname": platform.node(),
        "devices": engine_devices(),
        "versions": {
            "python": sys.version.split()[0],
            "numpy": _version("numpy"),
            "onnxruntime": _version("onnxruntime"),
            "openvino": _version("openvino"),
            "sdlite": _version("sdlite"),
            "torch": _version("torch"),
            "diffusers": _version("diffusers"),
            "optimum-intel": _version("optimum-intel"),
            "optimum-onnx": _version("optimum-onnx"),
        },
    }


def default_threads() -> int:
    """The CPUs this process may run on: every engine and peer is given this many threads."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
