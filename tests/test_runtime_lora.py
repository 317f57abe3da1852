"""LoRAs named in the prompt (``<lora:name:m>``, ``--lora-dir``), applied at run time as graph branches, checked
against diffusers' unfused ``load_lora_weights`` + ``set_adapters`` on the tiny model."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdlite import Pipeline
from sdlite.benchmarks.fidelity import psnr
from sdlite.cli import main
from sdlite.errors import InputError, SdliteWarning
from sdlite.hashing import tensor_data_sha256
from sdlite.lora_graph import ldm_path

pytest.importorskip("peft")  # diffusers' LoRA loader, the reference, needs it
pytestmark = pytest.mark.torch

RANK = 4
PROMPT = "a red circle on a blue square"
SEED = 11
STEPS = 4
# fp32 graphs against diffusers fp32 (PyTorch): kernel order only (decoded images, 0..1).
FP32_ATOL = 2e-3
# Reduced precisions against the fp32 graph with the same LoRAs, in dB: the bounds test_variants holds each
# variant to without LoRAs (OpenVINO's auto compute is bf16 here: "fp16" IR is judged as bf16).
MIN_PSNR = {("onnx", "fp16"): 55.0, ("onnx", "int8"): 32.0, ("openvino", "int8"): 32.0, ("openvino", "w8a8"): 30.0}
MIN_PSNR[("openvino", "fp16")] = 36.0


def _layers(pipe, kinds: tuple[str, ...]) -> dict[tuple[str, str], torch.Tensor]:
    """The weights a test LoRA changes: ``attention`` (kohya's usual set: attention, feed-forward, proj_in/out and
    the text encoder's linears) and/or ``conv`` (LoCon: 3x3 convolutions incl. the strided downsamplers, 1x1
    shortcuts, and the time-embedding linears, which export as Gemm)."""
    chosen = {}
    for name, module in pipe.unet.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or weight.ndim not in (2, 4):
            continue
        attention = re.search(r"(attn[12]\.to_(q|k|v|out\.0)|ff\.net\.(0\.proj|2)|proj_in|proj_out)$", name)
        conv = re.search(r"(conv[12]|conv_shortcut|samplers\.0\.conv|time_emb_proj|linear_1)$", name)
        if ("attention" in kinds and attention) or ("conv" in kinds and conv):
            chosen[("unet", name)] = weight
    if "attention" in kinds:
        for name, module in pipe.text_encoder.named_modules():
            if re.search(r"(q_proj|k_proj|v_proj|out_proj|fc1|fc2)$", name):
                chosen[("text_encoder", name)] = module.weight
    return chosen


def _random_lora(layers, seed: int, rank: int = RANK) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    result = {}
    for key, weight in layers.items():
        out_dim, in_dim, *kernel = weight.shape
        down = torch.randn(rank, in_dim, *kernel, generator=generator) * 0.2
        up = torch.randn(out_dim, rank, *([1] * len(kernel)), generator=generator) * 0.2
        result[key] = (down, up)
    return result


def _kohya_key(component: str, name: str, ldm: bool) -> str:
    if ldm and component == "unet":
        name = ldm_path(name, layers_per_block=1, up_attention={1, 2, 3}) or name
    return {"unet": "lora_unet_", "text_encoder": "lora_te_"}[component] + name.replace(".", "_")


def _write_kohya(lora, path, alpha: float, ldm: bool = False) -> None:
    state = {}
    for (component, name), (down, up) in lora.items():
        key = _kohya_key(component, name, ldm)
        state[f"{key}.lora_down.weight"] = down.contiguous()
        state[f"{key}.lora_up.weight"] = up.contiguous()
        state[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(state, path)


def _write_peft(lora, path, dtype=torch.float32) -> None:
    state = {}
    for (component, name), (down, up) in lora.items():
        state[f"{component}.{name}.lora_A.weight"] = down.to(dtype).contiguous()
        state[f"{component}.{name}.lora_B.weight"] = up.to(dtype).contiguous()
    save_file(state, path)


@pytest.fixture(scope="module")
def lora_dir(tiny_diffusers, tmp_path_factory):
    """style: kohya, alpha 2 (scale 0.5); other: PEFT; locon: PEFT convolutions and time embeddings;
    style_ldm: style's layers under the original SD key names."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_diffusers)
    folder = tmp_path_factory.mktemp("loras")
    style = _random_lora(_layers(pipe, ("attention",)), 1)
    _write_kohya(style, folder / "style.safetensors", alpha=2.0)
    _write_kohya(style, folder / "style_ldm.safetensors", alpha=2.0, ldm=True)
    _write_peft(_random_lora(_layers(pipe, ("attention",)), 2), folder / "other.safetensors")
    _write_peft(_random_lora(_layers(pipe, ("conv",)), 3, rank=2), folder / "locon.safetensors")
    return folder


@pytest.fixture(scope="module")
def reference(tiny_diffusers, lora_dir):
    """``reference(weights)``: diffusers' images with the LoRAs loaded unfused and ``set_adapters`` at ``weights``
    (name -> multiplier, or -> {"text_encoder": m, "unet": m})."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_diffusers, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    for name in ("style", "other", "locon"):
        pipe.load_lora_weights(str(lora_dir / f"{name}.safetensors"), adapter_name=name)

    def run(weights: dict) -> np.ndarray:
        pipe.set_adapters(list(weights), adapter_weights=list(weights.values()))
        generator = torch.Generator("cpu").manual_seed(SEED)
        return pipe(
            PROMPT, num_inference_steps=STEPS, height=64, width=64, output_type="np", generator=generator
        ).images

    return run


def _generate(pipe: Pipeline, tags: str, **options) -> np.ndarray:
    return pipe.txt2img(
        f"{PROMPT} {tags}".strip(),
        steps=STEPS,
        sampler="DDIM",
        seed=SEED,
        width=64,
        height=64,
        output_type="np",
        progress=False,
        **options,
    )


CASES = {
    "one kohya": ("<lora:style:0.8>", {"style": 0.8}),
    "three, kohya + PEFT + LoCon": (
        "<lora:style:1.2> <lora:other:0.3> <lora:locon:0.7>",
        {"style": 1.2, "other": 0.3, "locon": 0.7},
    ),
    "text encoder and U-Net apart": (
        "<lora:style:te=0.4:unet=1.1> <lora:other:0.9:0.5>",
        {"style": {"text_encoder": 0.4, "unet": 1.1}, "other": {"text_encoder": 0.9, "unet": 0.5}},
    ),
}


@pytest.mark.parametrize("engine", ["onnx", "openvino"])
def test_fp32_matches_diffusers_unfused(all_precisions, lora_dir, reference, engine):
    pipe = Pipeline.load(all_precisions, engine=engine, precision="fp32", compute="f32", lora_dir=lora_dir)
    plain = _generate(pipe, "")
    for case, (tags, weights) in CASES.items():
        image = _generate(pipe, tags)
        # The LoRAs change the image (a loader that skipped layers fails below).
        assert np.abs(image - plain).max() > 0.05, case
        np.testing.assert_allclose(image, reference(weights), atol=FP32_ATOL, rtol=0, err_msg=case)
    np.testing.assert_allclose(_generate(pipe, ""), plain, atol=0, rtol=0)


def test_original_sd_key_names(all_precisions, lora_dir):
    """kohya files that name layers as the original SD checkpoint does (input_blocks_4_1_...) apply the same."""
    pipe = Pipeline.load(all_precisions, precision="fp32", lora_dir=lora_dir)
    np.testing.assert_array_equal(_generate(pipe, "<lora:style_ldm:0.8>"), _generate(pipe, "<lora:style:0.8>"))


@pytest.mark.parametrize("engine, precision", sorted(MIN_PSNR))
def test_reduced_precisions_keep_their_tolerance(all_precisions, lora_dir, engine, precision):
    # The test LoRAs change each weight by about 40% of its size at multiplier 1, far more than trained ones do; at
    # 1.2 W8A8 loses 3 dB more (29 dB) because its activation ranges were calibrated without the LoRA and clip.
    tags = "<lora:style:0.5> <lora:other:0.3> <lora:locon:0.5>"
    fp32 = Pipeline.load(all_precisions, engine="onnx", precision="fp32", lora_dir=lora_dir)
    pipe = Pipeline.load(all_precisions, engine=engine, precision=precision, lora_dir=lora_dir, low_memory=True)
    assert psnr(_generate(pipe, tags), _generate(fp32, tags)) > MIN_PSNR[(engine, precision)]


def test_multipliers_change_without_reload_and_a_new_set_reloads_once(all_precisions, lora_dir):
    pipe = Pipeline.load(all_precisions, engine="openvino", precision="int8", lora_dir=lora_dir)
    loads = []

    class Loads:
        def after(self, part, action, seconds):
            if action == "load":
                loads.append(part)

    pipe.parts.observers.append(Loads())
    first = _generate(pipe, "<lora:style:0.8>")
    assert sorted(loads) == ["text_encoder", "unet"]  # the graph update: branches added
    assert set(pipe.loras.updates) == {"text_encoder", "unet"}
    loads.clear()
    second = _generate(pipe, "<lora:style:0.2>")
    assert loads == []  # a multiplier is an input
    assert np.abs(first - second).max() > 0.01
    np.testing.assert_array_equal(_generate(pipe, "<lora:style:0.8>"), first)
    _generate(pipe, "<lora:locon:1>")  # changes the U-Net only; the text encoder's branches go
    assert sorted(loads) == ["text_encoder", "unet"]


def test_infotext_keeps_the_tags_and_adds_lora_hashes(all_precisions, lora_dir):
    pipe = Pipeline.load(all_precisions, precision="fp32", lora_dir=lora_dir)
    image = pipe.txt2img(f"{PROMPT} <lora:style:0.8> <lora:other:0.5>", steps=1, seed=SEED, progress=False)[0]
    text = image.info["parameters"]
    assert text.startswith(f"{PROMPT} <lora:style:0.8> <lora:other:0.5>\n")
    style, other = (tensor_data_sha256(lora_dir / f"{n}.safetensors")[:12] for n in ("style", "other"))
    assert f'Lora hashes: "style: {style}, other: {other}"' in text


def test_fp16_files_and_low_memory(all_precisions, lora_dir, tmp_path, tiny_diffusers):
    """A LoRA saved in float16 (as most are) gives the float32 file's image within fp16 rounding, also when every
    part is loaded just before it runs."""
    from safetensors.torch import load_file

    state = load_file(lora_dir / "other.safetensors")
    save_file({k: v.half() for k, v in state.items()}, tmp_path / "other.safetensors")
    half = Pipeline.load(all_precisions, precision="fp32", lora_dir=tmp_path, low_memory=True)
    full = Pipeline.load(all_precisions, precision="fp32", lora_dir=lora_dir)
    assert np.abs(_generate(half, "<lora:other:1>") - _generate(full, "<lora:other:1>")).max() < 5e-3


def test_cli_generate_with_lora_dir(all_precisions, lora_dir, tmp_path, capsys):
    out = tmp_path / "a.png"
    argv = ["generate", f"{PROMPT} <lora:style:0.8>", "-m", str(all_precisions), "--precision", "fp32"]
    argv += ["--lora-dir", str(lora_dir), "--steps", "2", "-o", str(out), "--quiet", "--verbose"]
    assert main(argv) == 0
    assert re.search(
        r"LoRA graph update \(load, edit, first run\): text_encoder \d+\.\d+ s, unet \d+\.\d+ s",
        capsys.readouterr().err,
    )
    assert out.is_file()


def _bad_files(folder, tiny_diffusers):
    """One file per way a LoRA can be unusable here; name -> the error it must give."""
    folder.mkdir(exist_ok=True)
    save_file(
        {  # an SD 2.x width (1024) for the cross-attention keys
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(
                4, 1024
            ),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(32, 4),
        },
        folder / "sd2.safetensors",
    )
    save_file(
        {  # an SDXL layer layout
            "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_down.weight": torch.zeros(4, 32),
            "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q.lora_up.weight": torch.zeros(32, 4),
        },
        folder / "sdxl.safetensors",
    )
    save_file({"lora_te2_text_model_x.lora_down.weight": torch.zeros(2, 2)} | {
        "lora_te2_text_model_x.lora_up.weight": torch.zeros(2, 2)
    }, folder / "xl_te.safetensors")  # fmt: skip
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, folder / "loha.safetensors")
    save_file({"lora_unet_x.lokr_w1": torch.zeros(2, 2)}, folder / "lokr.safetensors")
    (folder / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    (folder / "pickled.pt").write_bytes(b"\x80\x04K\x01.")
    (folder / "twice").mkdir(exist_ok=True)
    for sub in ("a", "b"):
        (folder / "twice" / sub).mkdir(exist_ok=True)
        save_file({"lora_unet_x.alpha": torch.tensor(1.0)}, folder / "twice" / sub / "twin.safetensors")
    return {
        "sd2": "is 1024 -> 32, the model's is 32 -> 32",
        "sdxl": "matches no unet layer",
        "xl_te": "changes text_encoder_2, which this model lacks",
        "loha": "a LoHa file",
        "lokr": "a LoKr file",
        "corrupt": "corrupt safetensors file",
        "pickled": "is a pickle",
        "twin": "the name is used by",
        "missing": "no missing.safetensors under",
    }


def test_bad_loras_fail_with_one_line_and_write_nothing(all_precisions, tiny_diffusers, tmp_path, capsys):
    folder = tmp_path / "bad"
    for name, message in _bad_files(folder, tiny_diffusers).items():
        out = tmp_path / f"{name}.png"
        argv = ["generate", f"{PROMPT} <lora:{name}:0.5>", "-m", str(all_precisions), "--precision", "fp32"]
        code = main([*argv, "--lora-dir", str(folder), "--steps", "1", "-o", str(out), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 2, name
        assert len(err.splitlines()) == 1 and message in err, (name, err)
        assert not out.exists()


def test_tags_without_a_lora_dir_and_bad_tags(all_precisions):
    pipe = Pipeline.load(all_precisions, precision="fp32")
    with pytest.raises(InputError, match="no LoRA folder is given"):
        _generate(pipe, "<lora:style:1>")
    with pytest.raises(InputError, match="'strong' is not a number"):
        _generate(pipe, "<lora:style:strong>")
    with pytest.warns(SdliteWarning, match="negative prompt are not applied"):
        _generate(pipe, "", negative_prompt="blurry <lora:style:1>")
    # Tags never reach the text encoder: an unknown network type is dropped with a warning.
    with pytest.warns(SdliteWarning, match="hypernet networks are not supported"):
        tagged = _generate(pipe, "<hypernet:anime:1>")
    np.testing.assert_array_equal(tagged, _generate(pipe, ""))


def test_serve_with_a_missing_lora_dir_is_one_line(all_precisions, tmp_path, capsys):
    pytest.importorskip("uvicorn")
    argv = ["serve", "-m", str(all_precisions), "--lora-dir", str(tmp_path / "nope"), "--port", "0", "--quiet"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"error: --lora-dir {tmp_path / 'nope'}: folder not found"


def test_bench_loras_fit_a_folder_without_fp32_graphs(all_precisions, tmp_path):
    """The LoRA bench writes its LoRAs from the model's float graphs: fp32 when the folder has them, else fp16
    (same layers); the files load and change the model's layers."""
    import json
    import shutil

    from sdlite.benchmarks.lora import write_loras
    from sdlite.loras import LoraFile

    folder = tmp_path / "no-fp32"
    shutil.copytree(all_precisions, folder)
    manifest = json.loads((folder / "sdlite.json").read_text())
    for part, variants in manifest["components"].items():
        manifest["components"][part] = [v for v in variants if v["precision"] != "fp32"] or variants
    (folder / "sdlite.json").write_text(json.dumps(manifest))

    layers = []
    for model, out in ((all_precisions, tmp_path / "from-fp32"), (folder, tmp_path / "from-fp16")):
        out.mkdir()
        (path,) = write_loras(model, out, rank=2, count=1)
        read = LoraFile.read("bench0", path)
        layers.append({part: sorted(layer.module for layer in found) for part, found in read.layers.items()})
    assert layers[0] == layers[1] and set(layers[0]) == {"unet", "text_encoder"}
    pipe = Pipeline.load(folder, precision="fp16", lora_dir=tmp_path / "from-fp16")
    assert np.abs(_generate(pipe, "<lora:bench0:1>") - _generate(pipe, "")).max() > 0
