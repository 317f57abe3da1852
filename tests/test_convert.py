"""sdlite convert: the folder layout, validation figures, atomic writes and its errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import onnx
import pytest

from sdlite.cli import main
from sdlite.layout import PARTS as COMPONENTS

# Every test here needs torch: sdlite.convert on the tiny model.
pytestmark = pytest.mark.torch

EXPECTED_IO = {
    # optimum's pair first, then every layer's hidden state for clip skip (the tiny encoder has 2 layers).
    "text_encoder": (["input_ids"], ["last_hidden_state", "pooler_output", *(f"hidden_states.{i}" for i in range(3))]),
    "unet": (["sample", "timestep", "encoder_hidden_states"], ["out_sample"]),
    "vae_encoder": (["sample"], ["latent_parameters"]),
    "vae_decoder": (["latent_sample"], ["sample"]),
}


def test_folder_layout_and_manifest(tiny_onnx):
    for name in (
        "model_index.json",
        "sdlite.json",
        "scheduler/scheduler_config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
    ):
        assert (tiny_onnx / name).is_file(), name
    manifest = json.loads((tiny_onnx / "sdlite.json").read_text())
    assert manifest["family"] == "sd15" and manifest["prediction_type"] == "epsilon"
    assert manifest["default_size"] == [64, 64] and len(manifest["source_sha256"]) == 64
    for part in COMPONENTS:
        (variant,) = manifest["components"][part]
        assert variant["format"] == "onnx" and variant["precision"] == "fp32"
        assert variant["validation"]["passed"]
        # fp32 export vs PyTorch: well inside the part's tolerance.
        assert max(variant["validation"]["max_abs_diff"].values()) < 1e-4
        graph = onnx.load(str(tiny_onnx / part / "model.onnx"), load_external_data=False)
        inputs, outputs = EXPECTED_IO[part]
        assert [i.name for i in graph.graph.input] == inputs
        assert [o.name for o in graph.graph.output] == outputs
        assert (tiny_onnx / part / "config.json").is_file()
    assert "text_encoder/final_layer_norm.npz" in manifest["components"]["text_encoder"][0]["files"]


def test_existing_output_is_refused(tiny_diffusers, tiny_onnx, capsys):
    assert main(["convert", str(tiny_diffusers), str(tiny_onnx), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_missing_source(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nothing"), str(tmp_path / "out"), "--quiet"]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_pickle_refused_without_flag(tmp_path, capsys):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not read")
    assert main(["convert", str(ckpt), str(tmp_path / "out"), "--quiet"]) == 2
    assert "--allow-pickle" in capsys.readouterr().err


def test_unsupported_precision_is_named(tiny_diffusers, tmp_path, capsys):
    assert main(["convert", str(tiny_diffusers), str(tmp_path / "out"), "--precision", "fp33", "--quiet"]) == 2
    assert "fp33" in capsys.readouterr().err


def _finished_steps(work) -> list[str]:
    """The steps the journal of the conversion being built in ``work`` records as finished."""
    try:
        return list(json.loads((work / "journal.json").read_text())["steps"])
    except (OSError, ValueError):
        return []


def test_interrupted_convert_leaves_no_output_and_resumes(tiny_diffusers, tmp_path):
    """SIGINT midway: no output folder, one line saying how to continue, and --resume finishes the folder."""
    out = tmp_path / "out"
    work = tmp_path / ".out.sdlite-partial"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdlite", "convert", str(tiny_diffusers), str(out), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # A shell that starts the tests in the background leaves SIGINT ignored, children inherit that, and
        # Python then installs no KeyboardInterrupt handler: give the child the default disposition back.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while time.time() < deadline and not _finished_steps(work):
        time.sleep(0.05)
    assert _finished_steps(work), "conversion never finished a step"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    err = err.decode(errors="replace")
    assert proc.returncode == 130, err[-2000:]
    assert not out.exists()
    assert len(err.strip().splitlines()) == 1 and "--resume" in err, err
    resumed = subprocess.run(
        [sys.executable, "-m", "sdlite", "convert", str(tiny_diffusers), str(out), "--quiet", "--resume"],
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "sdlite.json").is_file() and not work.exists()


def test_split_geglu_computes_what_diffusers_geglu_does(tiny_diffusers):
    """The U-Net's GEGLU layers are exported as two projections: same outputs, weights shared, not copied."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.activations import GEGLU

    from sdlite.convert.geglu import SplitGEGLU, split_geglu

    geglu = GEGLU(24, 40)
    x = torch.randn(2, 7, 24)
    split = SplitGEGLU(geglu)
    assert split.value.weight.data_ptr() == geglu.proj.weight.data_ptr()
    torch.testing.assert_close(split(x), geglu(x), rtol=0, atol=1e-6)

    unet = UNet2DConditionModel.from_pretrained(tiny_diffusers / "unet")
    sample, encoder = torch.randn(2, 4, 8, 8), torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        before = unet(sample, 10, encoder).sample
        assert split_geglu(unet) == sum(isinstance(m, SplitGEGLU) for m in unet.modules()) > 0
        assert not any(isinstance(m, GEGLU) for m in unet.modules())
        torch.testing.assert_close(unet(sample, 10, encoder).sample, before, rtol=0, atol=1e-5)
