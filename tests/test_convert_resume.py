"""Bounded-memory conversion: the budget check up front, and --resume after the process is killed mid-way.

The kills are real (SIGKILL from inside the converting process, as the U-Net's export starts and as NNCF starts
the second statistics run of its W8A8 quantization), so nothing in the converter gets a chance to clean up; the
resumed folder must equal, file for file, the one an uninterrupted conversion writes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sdlite.convert.journal import JOURNAL, work_dir
from sdlite.hashing import sha256_file

pytestmark = pytest.mark.torch

OPTIONS = ["--format", "both", "--precision", "fp32,w8a8", "--quiet"]

# Runs the CLI in a child process that kills itself with SIGKILL when the patched function is reached.
KILLER = """
import os, signal, sys
import {module} as target
original = target.{function}
def killed(*args, **kwargs):
    if {condition}:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
target.{function} = killed
from sdlite.cli import main
sys.exit(main(["convert", *sys.argv[1:]]))
"""


def _convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sdlite", "convert", *args], capture_output=True, text=True, timeout=600
    )


def _killed_convert(module: str, function: str, condition: str, *args: str) -> subprocess.CompletedProcess:
    code = KILLER.format(module=module, function=function, condition=condition)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600)


def _contents(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def uninterrupted(tiny_diffusers, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("whole") / "model"
    result = _convert(str(tiny_diffusers), str(out), *OPTIONS)
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize(
    ("module", "function", "condition"),
    [
        # At the start of the U-Net's ONNX export (the text encoder is finished by then).
        ("sdlite.convert.converter", "export_onnx", "args[0].name == 'unet'"),
        # In the U-Net's W8A8 quantization, as NNCF starts its second statistics run (its export and calibration
        # are journaled; the intermediate model is on disk).
        (
            "nncf.quantization.algorithms.pipeline",
            "collect_statistics",
            "globals().setdefault('calls', []).append(1) or len(calls) == 2",
        ),
    ],
    ids=["export", "quantize"],
)
def test_resume_after_kill_equals_uninterrupted(uninterrupted, tiny_diffusers, tmp_path, module, function, condition):
    out = tmp_path / "model"
    killed = _killed_convert(module, function, condition, str(tiny_diffusers), str(out), *OPTIONS)
    assert killed.returncode == -9, killed.stderr
    assert not out.exists()
    journal = json.loads((work_dir(out) / JOURNAL).read_text())
    assert "text_encoder/base" in journal["steps"]
    if function == "collect_statistics":
        # The killed step's intermediate models are left on disk; a resume deletes them before it starts again.
        left = sorted((work_dir(out) / ".base").glob(".steps-*"))
        assert left
        first_run = "globals().setdefault('calls', []).append(1) or len(calls) == 1"
        again = _killed_convert(module, function, first_run, str(tiny_diffusers), str(out), *OPTIONS, "--resume")
        assert again.returncode == -9, again.stderr
        assert not any(folder.exists() for folder in left)

    resumed = _convert(str(tiny_diffusers), str(out), *OPTIONS, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert not work_dir(out).exists()
    assert _contents(out) == _contents(uninterrupted)


def test_resume_with_other_options_is_refused(tiny_diffusers, tmp_path):
    out = tmp_path / "model"
    killed = _killed_convert(
        "sdlite.convert.converter", "export_onnx", "args[0].name == 'unet'", str(tiny_diffusers), str(out), *OPTIONS
    )
    assert killed.returncode == -9
    other = _convert(str(tiny_diffusers), str(out), "--format", "onnx", "--quiet", "--resume")
    assert other.returncode == 2
    lines = other.stderr.strip().splitlines()
    assert len(lines) == 1 and "--resume" in lines[0] and "formats" in lines[0], other.stderr
    assert not out.exists()
    # Without --resume the stale work folder is replaced by a fresh conversion.
    fresh = _convert(str(tiny_diffusers), str(out), "--format", "onnx", "--quiet")
    assert fresh.returncode == 0, fresh.stderr
    assert not work_dir(out).exists()


def test_memory_budget_refuses_an_impossible_plan_up_front(tiny_diffusers, tmp_path):
    out = tmp_path / "model"
    result = _convert(str(tiny_diffusers), str(out), *OPTIONS, "--memory-budget", "0.05")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--memory-budget 0.05" in lines[0] and "needs about" in lines[0] and "GB" in lines[0]
    assert not out.exists() and not work_dir(out).exists()


@pytest.mark.parametrize("budget", ["0", "-1", "nan"])
def test_memory_budget_must_be_positive(tiny_diffusers, tmp_path, budget):
    result = _convert(str(tiny_diffusers), str(tmp_path / "model"), "--memory-budget", budget)
    assert result.returncode == 2
    assert "--memory-budget" in result.stderr and len(result.stderr.strip().splitlines()) == 1
