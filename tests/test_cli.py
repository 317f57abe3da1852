"""The command line: a whole generation without torch, infotext in the PNG, and one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdlite.cli import main
from sdlite.schedulers import names as sampler_names


def _generate(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "generate",
        "a red circle on a blue background",
        "-m",
        str(model),
        "-o",
        str(out),
        "--steps",
        "3",
        "--seed",
        "42",
        "--quiet",
        *extra,
    ]


def test_generate_runs_without_torch(tiny_onnx, tmp_path):
    """A whole ``sdlite generate`` in a fresh process where torch, diffusers and transformers never load."""
    out = tmp_path / "out.png"
    code = (
        "import sys\n"
        "from sdlite.cli import main\n"
        f"rc = main({_generate(tiny_onnx, out)!r})\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
        "sys.exit(rc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout
    assert Image.open(out).size == (64, 64)


def test_png_carries_infotext_and_reruns_identically(tiny_onnx, tmp_path):
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    args = ("-n", "ugly, blurry", "--cfg", "7", "--sampler", "euler a")
    assert main(_generate(tiny_onnx, first, *args)) == 0
    assert main(_generate(tiny_onnx, second, *args)) == 0
    infotext = Image.open(first).info["parameters"]
    lines = infotext.split("\n")
    assert lines[0] == "a red circle on a blue background"
    assert lines[1] == "Negative prompt: ugly, blurry"
    assert lines[2].startswith(
        "Steps: 3, Sampler: Euler a, Schedule type: Uniform, CFG scale: 7, Seed: 42, Size: 64x64, Model hash: "
    )
    manifest = json.loads((tiny_onnx / "sdlite.json").read_text())
    assert f"Model hash: {manifest['source_sha256'][:10]}, Model: tiny" in lines[2]
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))


def test_batch_writes_one_file_per_image(tiny_onnx, tmp_path):
    assert main(_generate(tiny_onnx, tmp_path / "grid.png", "--batch", "2")) == 0
    seeds = [
        Image.open(tmp_path / f"grid-{i}.png").info["parameters"].split("Seed: ")[1].split(",")[0] for i in range(2)
    ]
    assert seeds == ["42", "43"]


def test_info_lists_parts_and_validation(tiny_onnx, capsys):
    assert main(["info", str(tiny_onnx)]) == 0
    out = capsys.readouterr().out
    for part in ("text_encoder", "unet", "vae_encoder", "vae_decoder"):
        assert part in out
    assert "max|diff| vs PyTorch" in out and "FAILED" not in out


@pytest.fixture
def broken_copy(tiny_onnx, tmp_path):
    """A private copy of the converted tiny model that a test may damage."""
    copy = tmp_path / "model"
    shutil.copytree(tiny_onnx, copy)
    return copy


def _expect_error(capsys, argv: list[str], *fragments: str, out: Path | None = None) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    return err


def test_missing_model_folder(tmp_path, capsys):
    out = tmp_path / "o.png"
    _expect_error(capsys, _generate(tmp_path / "nope", out), "nope", "not found", out=out)


def test_folder_missing_a_part(broken_copy, tmp_path, capsys):
    (broken_copy / "unet" / "model.onnx").unlink()
    out = tmp_path / "o.png"
    _expect_error(capsys, _generate(broken_copy, out), "unet", "missing", out=out)


def test_corrupt_onnx_file(broken_copy, tmp_path, capsys):
    (broken_copy / "unet" / "model.onnx").write_bytes(b"\x08\x07 this is not a protobuf" * 10)
    out = tmp_path / "o.png"
    _expect_error(capsys, _generate(broken_copy, out), "model.onnx", "corrupt", out=out)


def test_truncated_onnx_file(broken_copy, tmp_path, capsys):
    graph = broken_copy / "vae_decoder" / "model.onnx"
    graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])
    out = tmp_path / "o.png"
    _expect_error(capsys, _generate(broken_copy, out), "vae_decoder", "corrupt", out=out)


def test_size_not_multiple_of_8(tiny_onnx, tmp_path, capsys):
    out = tmp_path / "o.png"
    _expect_error(capsys, _generate(tiny_onnx, out, "--size", "500x512"), "500x512", "multiples of 8", out=out)


def test_steps_below_one(tiny_onnx, tmp_path, capsys):
    out = tmp_path / "o.png"
    _expect_error(capsys, [*_generate(tiny_onnx, out), "--steps", "0"], "steps", out=out)


def test_unknown_sampler_lists_known(tiny_onnx, tmp_path, capsys):
    out = tmp_path / "o.png"
    err = _expect_error(capsys, _generate(tiny_onnx, out, "--sampler", "Euler z"), "Euler z", out=out)
    for name in sampler_names():
        assert name in err


def test_output_in_missing_folder(tiny_onnx, tmp_path, capsys):
    out = tmp_path / "missing" / "o.png"
    _expect_error(capsys, _generate(tiny_onnx, out), "does not exist")


def test_bad_usage_is_one_line(capsys):
    _expect_error(capsys, ["generate"], "prompt")


def test_console_script_exit_code(tmp_path):
    """The installed entry point exits 2 with one line, no traceback."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-m", "sdlite", "generate", "x", "-m", str(tmp_path / "none"), "-o", str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr


def test_image_modes_from_the_command_line(tiny_onnx, tmp_path):
    source, mask = tmp_path / "in.png", tmp_path / "mask.png"
    assert main(_generate(tiny_onnx, source)) == 0
    Image.fromarray(np.pad(np.full((32, 32), 255, np.uint8), 16)).save(mask)
    common = ["-m", str(tiny_onnx), "--steps", "3", "--seed", "1", "--quiet", "--image", str(source)]
    assert main(["img2img", "a blue square", *common, "--strength", "0.5", "-o", str(tmp_path / "a.png")]) == 0
    assert main(["inpaint", "a blue square", *common, "--mask", str(mask), "-o", str(tmp_path / "b.png")]) == 0
    assert main(["outpaint", "a blue square", *common, "--extend", "0,0,32,0", "-o", str(tmp_path / "c.png")]) == 0
    assert Image.open(tmp_path / "a.png").info["parameters"].count("Denoising strength: 0.5") == 1
    assert Image.open(tmp_path / "c.png").size == (96, 64)


def test_image_mode_errors(tiny_onnx, tmp_path, capsys):
    source = tmp_path / "in.png"
    Image.new("RGB", (64, 64)).save(source)
    out = tmp_path / "o.png"
    base = ["-m", str(tiny_onnx), "--image", str(source), "-o", str(out)]
    _expect_error(capsys, ["img2img", "x", *base, "--strength", "1.5"], "strength", out=out)
    _expect_error(capsys, ["inpaint", "x", *base, "--mask", str(tmp_path / "none.png")], "not found", out=out)
    _expect_error(capsys, ["outpaint", "x", *base, "--extend", "0,0,20,0"], "multiple of 8", out=out)
    _expect_error(capsys, ["outpaint", "x", *base, "--extend", "1,2"], "four numbers", out=out)
