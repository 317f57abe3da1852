"""A catalogue of bad input, torch-free, through the command line on (copies of) the embedded model.

Each case must end in exit code 2 (bad input) or 1 (a failure while running), one line on stderr starting with
"error:", no traceback, and no output file. Cases: wrong numbers and names, impossible sizes (the memory guard),
bad images and masks, and converted folders whose files are there but wrong.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdlite.cli import main
from sdlite.models import default_model_path

Edit = Callable[[Path], None]


def _json_edit(relative: str, change: Callable[[dict], object]) -> Edit:
    def edit(model: Path) -> None:
        path = model / relative
        data = json.loads(path.read_text())
        result = change(data)
        path.write_text(json.dumps(data if result is None else result))

    return edit


def _write(relative: str, content: bytes | str) -> Edit:
    def edit(model: Path) -> None:
        path = model / relative
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return edit


def _remove(relative: str) -> Edit:
    def edit(model: Path) -> None:
        target = model / relative
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    return edit


def _swap(part: str, other: str) -> Edit:
    def edit(model: Path) -> None:
        shutil.copy(model / other / "model.onnx", model / part / "model.onnx")

    return edit


def _truncate(relative: str, keep: int) -> Edit:
    def edit(model: Path) -> None:
        path = model / relative
        path.write_bytes(path.read_bytes()[:keep])

    return edit


def _set(key: str, value: object) -> Callable[[dict], None]:
    return lambda data: data.__setitem__(key, value)


def _set_variant(part: str, key: str, value: object) -> Callable[[dict], None]:
    return lambda data: data["components"][part][0].__setitem__(key, value)


MANIFEST, SCHEDULER = "sdlite.json", "scheduler/scheduler_config.json"

# Folder cases: files present, contents wrong.
FOLDER_CASES: dict[str, Edit] = {
    "unet slot holds the VAE decoder": _swap("unet", "vae_decoder"),
    "text encoder slot holds the U-Net": _swap("text_encoder", "unet"),
    "VAE decoder slot holds the text encoder": _swap("vae_decoder", "text_encoder"),
    "unet graph empty": _write("unet/model.onnx", b""),
    "unet graph truncated": _truncate("unet/model.onnx", 5000),
    "text encoder graph is text": _write("text_encoder/model.onnx", "not a graph"),
    "vae decoder missing": _remove("vae_decoder/model.onnx"),
    "unet folder missing": _remove("unet"),
    "manifest not JSON": _write(MANIFEST, "{"),
    "manifest is a list": _write(MANIFEST, "[1, 2]"),
    "manifest size is text": _json_edit(MANIFEST, _set("default_size", "big")),
    "manifest size has three numbers": _json_edit(MANIFEST, _set("default_size", [64, 64, 64])),
    "manifest size negative": _json_edit(MANIFEST, _set("default_size", [-64, 64])),
    "manifest scale is text": _json_edit(MANIFEST, _set("vae_scaling_factor", "x")),
    "manifest scale is zero": _json_edit(MANIFEST, _set("vae_scaling_factor", 0)),
    "manifest prediction unknown": _json_edit(MANIFEST, _set("prediction_type", "noise")),
    "manifest prediction is a number": _json_edit(MANIFEST, _set("prediction_type", 5)),
    "manifest components is a list": _json_edit(MANIFEST, _set("components", [1])),
    "manifest name missing": _json_edit(MANIFEST, lambda data: data.pop("name")),
    "manifest variant without files": _json_edit(MANIFEST, _set_variant("unet", "files", {})),
    "manifest variant format unknown": _json_edit(MANIFEST, _set_variant("unet", "format", "tflite")),
    "manifest variant file outside the folder": _json_edit(
        MANIFEST, _set_variant("unet", "files", {"../../etc/passwd": ""})
    ),
    "manifest variant merging out of range": _json_edit(MANIFEST, _set_variant("unet", "token_merging", 3)),
    "manifest loras malformed": _json_edit(MANIFEST, _set("loras", [{"weight": 1}])),
    "model index not JSON": _write("model_index.json", "{{{"),
    "tokenizer vocab missing": _remove("tokenizer/vocab.json"),
    "tokenizer merges missing": _remove("tokenizer/merges.txt"),
    "tokenizer vocab not JSON": _write("tokenizer/vocab.json", "{"),
    "tokenizer vocab not ids": _write("tokenizer/vocab.json", '{"a": "b"}'),
    "tokenizer folder missing": _remove("tokenizer"),
    "scheduler config is a list": _write(SCHEDULER, "[1]"),
    "scheduler config not JSON": _write(SCHEDULER, "nope"),
    "scheduler beta schedule unknown": _json_edit(SCHEDULER, _set("beta_schedule", "weird")),
    "scheduler train steps is text": _json_edit(SCHEDULER, _set("num_train_timesteps", "x")),
    "scheduler prediction unknown": _json_edit(SCHEDULER, _set("prediction_type", "noise")),
    "unet config channels text": _write("unet/config.json", '{"in_channels": "x"}'),
    "unet config is a list": _write("unet/config.json", "[1]"),
    "vae config widths a number": _write("vae_decoder/config.json", '{"block_out_channels": 5}'),
    "vae config scale negative": _write("vae_decoder/config.json", '{"scaling_factor": -1}'),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    paths = {}
    for name, size in (("image", (64, 64)), ("odd", (60, 52)), ("mask", (64, 64)), ("tiny", (4, 4))):
        path = folder / f"{name}.png"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths[name] = path
    black = folder / "black.png"
    Image.new("L", (64, 64), 0).save(black)
    paths["black"] = black
    (folder / "text.png").write_text("not an image")
    paths["text"] = folder / "text.png"
    return paths


def _generation_cases(images: dict[str, Path]) -> dict[str, list[str]]:
    image, mask = str(images["image"]), str(images["mask"])
    return {
        "cfg nan": ["generate", "x", "--cfg", "nan"],
        "cfg inf": ["generate", "x", "--cfg", "inf"],
        "cfg negative": ["generate", "x", "--cfg", "-1"],
        "cfg huge": ["generate", "x", "--cfg", "1e9"],
        "steps zero": ["generate", "x", "--steps", "0"],
        "steps huge": ["generate", "x", "--steps", "100000"],
        "steps text": ["generate", "x", "--steps", "ten"],
        "batch zero": ["generate", "x", "--batch", "0"],
        "batch huge": ["generate", "x", "--batch", "100000"],
        "seed beyond 64 bits": ["generate", "x", "--seed", str(2**70)],
        "clip skip zero": ["generate", "x", "--clip-skip", "0"],
        "clip skip beyond the layers": ["generate", "x", "--clip-skip", "50"],
        "size text": ["generate", "x", "--size", "big"],
        "size not multiple of 8": ["generate", "x", "--size", "63x64"],
        "size zero": ["generate", "x", "--size", "0x64"],
        "size beyond the maximum side": ["generate", "x", "--size", "131072x64"],
        "size beyond memory": ["generate", "x", "--size", "16384x16384"],
        "batch beyond memory": ["generate", "x", "--size", "1024x1024", "--batch", "64"],
        "sampler unknown": ["generate", "x", "--sampler", "Warp Drive"],
        "schedule unknown": ["generate", "x", "--schedule", "zigzag"],
        "schedule the sampler cannot take": ["generate", "x", "--sampler", "DDIM", "--schedule", "karras"],
        "sampler names another schedule": ["generate", "x", "--sampler", "DPM++ 2M Karras", "--schedule", "beta"],
        "engine unknown": ["generate", "x", "--engine", "tensorrt"],
        "compute unknown": ["generate", "x", "--compute", "f8"],
        "compute onnxruntime cannot do": ["generate", "x", "--compute", "bf16"],
        "precision not held": ["generate", "x", "--precision", "int4"],
        "device unknown": ["generate", "x", "--device", "QPU"],
        "seed source unknown": ["generate", "x", "--seed-source", "dice"],
        "memory budget negative": ["generate", "x", "--memory-budget", "-1"],
        "memory budget nan": ["generate", "x", "--memory-budget", "nan"],
        "embeddings folder missing": ["generate", "x", "--embeddings", "/nonexistent/embeddings"],
        "model folder missing": ["generate", "x", "-m", "/nonexistent/model"],
        "model is a file": ["generate", "x", "-m", str(images["image"])],
        "watermark on a small image": ["generate", "x", "--watermark"],
        "img2img strength zero": ["img2img", "x", "--image", image, "--strength", "0"],
        "img2img strength above one": ["img2img", "x", "--image", image, "--strength", "1.5"],
        "img2img strength nan": ["img2img", "x", "--image", image, "--strength", "nan"],
        "img2img image missing": ["img2img", "x", "--image", "/nonexistent.png"],
        "img2img image not an image": ["img2img", "x", "--image", str(images["text"])],
        "img2img resize unknown": ["img2img", "x", "--image", image, "--resize", "squash"],
        "inpaint mask empty": ["inpaint", "x", "--image", image, "--mask", str(images["black"])],
        "inpaint mask missing": ["inpaint", "x", "--image", image, "--mask", "/nonexistent.png"],
        "inpaint mask not an image": ["inpaint", "x", "--image", image, "--mask", str(images["text"])],
        "inpaint mask blur negative": ["inpaint", "x", "--image", image, "--mask", mask, "--mask-blur", "-3"],
        "inpaint padding negative": [
            *("inpaint", "x", "--image", image, "--mask", mask, "--only-masked", "--padding", "-5"),
        ],
        "outpaint extend text": ["outpaint", "x", "--image", image, "--extend", "a,b,c,d"],
        "outpaint extend three numbers": ["outpaint", "x", "--image", image, "--extend", "8,8,8"],
        "outpaint extend negative": ["outpaint", "x", "--image", image, "--extend", "-8,0,0,0"],
        "outpaint extend not multiple of 8": ["outpaint", "x", "--image", image, "--extend", "5,0,0,0"],
        "outpaint extend nothing": ["outpaint", "x", "--image", image, "--extend", "0,0,0,0"],
        "outpaint extend beyond memory": ["outpaint", "x", "--image", image, "--extend", "0,0,16384,16384"],
        "outpaint extend beyond the maximum side": ["outpaint", "x", "--image", image, "--extend", "0,0,200000,0"],
        "outpaint image not multiple of 8": ["outpaint", "x", "--image", str(images["odd"]), "--extend", "8,0,0,0"],
        "unknown subcommand": ["paint", "x"],
        "unknown flag": ["generate", "x", "--turbo"],
    }


def _check_refused(argv: list[str], out: Path, capsys) -> None:
    code = main(
        [*argv, "-o", str(out), "--quiet"] if argv[0] in ("generate", "img2img", "inpaint", "outpaint") else argv
    )
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code in (1, 2), f"{argv}: exit code {code}, stderr {captured.err!r}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{argv}: {captured.err!r}"
    assert "Traceback" not in captured.err and "unexpected" not in captured.err, captured.err
    assert not out.exists() and not list(out.parent.glob("*.png")), f"{argv}: an image was written"


@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_broken_model_folder_is_refused(case, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(default_model_path(), model)
    FOLDER_CASES[case](model)
    outputs = tmp_path / "out"
    outputs.mkdir()
    _check_refused(["generate", "a red circle", "-m", str(model), "--steps", "1"], outputs / "x.png", capsys)


def test_catalogue_has_sixty_cases(images):
    assert len(FOLDER_CASES) + len(_generation_cases(images)) >= 60


@pytest.mark.parametrize(
    "case", list(_generation_cases({k: Path(k) for k in ("image", "mask", "odd", "tiny", "black", "text")}))
)
def test_bad_generation_input_is_refused(case, images, tmp_path, capsys):
    argv = _generation_cases(images)[case]
    _check_refused(
        [*argv, "--steps", "1"] if "--steps" not in argv and argv[0] != "paint" else argv, tmp_path / "x.png", capsys
    )


def test_memory_guard_refuses_fast_with_the_estimate(tmp_path, capsys):
    import time

    start = time.perf_counter()
    code = main(["generate", "x", "--size", "16384x16384", "-o", str(tmp_path / "x.png"), "--quiet"])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2 and "needs about" in err and "can be used" in err and "fits" in err, err
    assert elapsed < 2.0, elapsed


def test_non_finite_latents_are_an_error_naming_the_step(monkeypatch):
    from sdlite import Pipeline
    from sdlite.errors import InputError, SdliteError

    pipe = Pipeline.load(default_model_path())
    real_get = pipe.parts.get

    class BrokenUNet:
        """The real U-Net whose outputs turn to NaN, as an fp16 overflow would make them."""

        def __init__(self, engine):
            self.engine, self.input_names, self.output_names = engine, engine.input_names, engine.output_names

        def run(self, inputs):
            return {name: value * np.nan for name, value in self.engine.run(inputs).items()}

    monkeypatch.setattr(
        pipe.parts, "get", lambda part: BrokenUNet(real_get(part)) if part == "unet" else real_get(part)
    )
    with pytest.raises(SdliteError, match="the U-Net at step 1 of 3 produced non-finite values") as raised:
        pipe.txt2img("a red circle", steps=3, sampler="Euler", progress=False)
    assert not isinstance(raised.value, InputError)  # a failure while running: exit code 1
