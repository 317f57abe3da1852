"""The few-step regime against diffusers: TAESD (AutoencoderTiny) decoding and encoding, latent consistency models,
trailing-spacing Euler at 1-4 steps (SD-Turbo, Lightning), v-prediction with zero terminal SNR and guidance rescale,
and an LCM-LoRA fused at conversion."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from noise_routing import route_randn
from test_masks import _image

from sdlite import Pipeline
from sdlite.errors import InputError, SdliteWarning
from sdlite.rng import NoiseGenerator

# fp32 ONNX vs fp32 PyTorch on the same weights and noise: kernel-order differences only.
DECODED_ATOL = 2e-3
PROMPT = "a red circle on a blue background"
NEGATIVE = "blurry"
SEED = 5
SIZE = 64


@pytest.fixture
def shared_noise(monkeypatch):
    """Make diffusers draw every random tensor from sdlite's noise stream for SEED, in call order."""
    import diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img as lcm_pipe
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion as sd_module
    import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as img2img_module
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a_module
    import diffusers.schedulers.scheduling_lcm as lcm_module

    route_randn(monkeypatch, SEED, (sd_module, img2img_module, euler_a_module, lcm_module, lcm_pipe))


@pytest.fixture(scope="module")
def models(tiny_diffusers, tmp_path_factory):
    """Diffusers folders and their sdlite conversions: tiny with a tiny VAE beside it, tiny-lcm, tiny-sd2-v."""
    from sdlite.convert.converter import convert
    from sdlite.models.recipes import build

    root = tmp_path_factory.mktemp("few-step")
    build("tiny-taesd", root / "taesd")
    convert(str(tiny_diffusers), root / "tiny", quiet=True, tiny_vae=str(root / "taesd"))
    for recipe in ("tiny-lcm", "tiny-sd2-v"):
        build(recipe, root / f"{recipe}-src")
        convert(str(root / f"{recipe}-src"), root / recipe, quiet=True)
    return root


def _reference(pipeline_class, folder, scheduler=None, **components):
    pipe = pipeline_class.from_pretrained(folder, safety_checker=None, requires_safety_checker=False, **components)
    pipe.set_progress_bar_config(disable=True)
    if scheduler is not None:
        pipe.scheduler = scheduler(pipe.scheduler.config)
    return pipe


def _tiny_vae(models):
    from diffusers import AutoencoderTiny

    return AutoencoderTiny.from_pretrained(models / "taesd")


def _check(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    diff = float(np.max(np.abs(got - expected)))
    assert diff < DECODED_ATOL, f"max |diff| {diff:.2e}"


def test_taesd_decode_and_encode_match_autoencoder_tiny(models):
    vae = _tiny_vae(models)
    pipe = Pipeline.load(models / "tiny", vae="taesd")
    latents = NoiseGenerator(3).randn((2, 4, 12, 10))
    with torch.no_grad():
        expected = vae.decode(torch.from_numpy(latents)).sample.numpy()
    _check(pipe.vae.decode(latents), np.clip(expected / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1))
    pixels = np.random.default_rng(0).uniform(-1, 1, (1, 3, 96, 80)).astype(np.float32)
    with torch.no_grad():
        expected = vae.encode(torch.from_numpy(pixels)).latents.numpy()
    assert float(np.max(np.abs(pipe.vae.encode_latents(pixels) - expected))) < 1e-4


@pytest.mark.parametrize("mode", ["txt2img", "img2img"])
def test_taesd_pipeline_matches_diffusers(models, tiny_diffusers, shared_noise, mode):
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    options = dict(negative_prompt=NEGATIVE, guidance_scale=7.5, num_inference_steps=4, output_type="np")
    ours = Pipeline.load(models / "tiny", vae="taesd")
    common = dict(negative_prompt=NEGATIVE, cfg_scale=7.5, steps=4, sampler="Euler a", seed=SEED, progress=False)
    if mode == "txt2img":
        reference = _reference(
            StableDiffusionPipeline, tiny_diffusers, EulerAncestralDiscreteScheduler.from_config, vae=_tiny_vae(models)
        )
        expected = reference(PROMPT, height=SIZE, width=SIZE, **options).images
        got = ours.txt2img(PROMPT, width=SIZE, height=SIZE, output_type="np", **common)
    else:
        reference = _reference(
            StableDiffusionImg2ImgPipeline,
            tiny_diffusers,
            EulerAncestralDiscreteScheduler.from_config,
            vae=_tiny_vae(models),
        )
        expected = reference(PROMPT, image=_image(), strength=0.6, **options).images
        got = ours.img2img(PROMPT, _image(), strength=0.6, output_type="np", **common)
    _check(got, expected)
    image = ours.txt2img(PROMPT, steps=1, seed=1, progress=False)[0]
    assert "VAE: taesd" in image.info["parameters"]


def test_taesd_renders_previews_and_is_asked_for_by_name(models):
    pipe = Pipeline.load(models / "tiny")  # the full VAE decodes, the tiny one previews
    assert pipe.preview_codec.decoder_part == "taesd_decoder"
    previews = []
    pipe.txt2img(PROMPT, steps=3, sampler="Euler", seed=1, progress=False, callback=lambda *a: previews.append(a[3]))
    assert len(previews) == 3 and pipe.preview(previews[-1])[0].size == (SIZE, SIZE)
    with pytest.raises(InputError, match="no tiny VAE; convert the model with --tiny-vae"):
        Pipeline.load(models / "tiny-lcm", vae="taesd")
    with pytest.raises(InputError, match="vae 'tiny': unknown"):
        Pipeline.load(models / "tiny", vae="tiny")


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_lcm_matches_latent_consistency_pipeline(models, shared_noise, steps):
    from diffusers import LatentConsistencyModelPipeline

    reference = _reference(LatentConsistencyModelPipeline, models / "tiny-lcm-src")
    expected = reference(
        PROMPT, num_inference_steps=steps, guidance_scale=8.5, height=SIZE, width=SIZE, output_type="np"
    ).images
    ours = Pipeline.load(models / "tiny-lcm")
    assert ours.default_sampler == "LCM"
    got = ours.txt2img(PROMPT, steps=steps, cfg_scale=8.5, seed=SEED, output_type="np", progress=False)
    _check(got, expected)


def test_embedded_guidance_runs_one_pass_and_reports_the_unused_negative(models):
    pipe = Pipeline.load(models / "tiny-lcm")
    batches = []
    unet = pipe.parts.get("unet")
    run = unet.run
    unet.run = lambda inputs: batches.append(len(inputs["sample"])) or run(inputs)
    with pytest.warns(SdliteWarning, match="negative prompt is not used: this model embeds the CFG scale"):
        pipe.txt2img(PROMPT, negative_prompt=NEGATIVE, steps=2, cfg_scale=8.0, seed=1, progress=False)
    assert batches == [1, 1]
    # Different scales reach the U-Net through its embedding.
    a = pipe.txt2img(PROMPT, steps=2, cfg_scale=2.0, seed=1, output_type="np", progress=False)
    b = pipe.txt2img(PROMPT, steps=2, cfg_scale=8.0, seed=1, output_type="np", progress=False)
    assert float(np.max(np.abs(a - b))) > 1e-3


def test_negative_prompt_at_cfg_one_is_reported_unused(models):
    pipe = Pipeline.load(models / "tiny")
    with pytest.warns(SdliteWarning, match="negative prompt is not used: at CFG scale 1"):
        pipe.txt2img(PROMPT, negative_prompt=NEGATIVE, steps=1, cfg_scale=1.0, seed=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.txt2img(PROMPT, steps=1, cfg_scale=1.0, seed=1, progress=False)


@pytest.fixture(scope="module")
def trailing_models(tiny_diffusers, tmp_path_factory):
    """sampler -> (the tiny diffusers model with that Euler scheduler on "trailing" timesteps, its conversion),
    made at first use."""
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    from sdlite.convert.converter import convert

    made = {}

    def model(sampler: str) -> tuple[Path, Path]:
        if sampler not in made:
            root = tmp_path_factory.mktemp("trailing")
            source = root / "src"
            shutil.copytree(tiny_diffusers, source)
            config_file = source / "scheduler" / "scheduler_config.json"
            config = json.loads(config_file.read_text())
            scheduler_class = EulerDiscreteScheduler if sampler == "Euler" else EulerAncestralDiscreteScheduler
            config.update(_class_name=scheduler_class.__name__, timestep_spacing="trailing")
            config_file.write_text(json.dumps(config))
            index = source / "model_index.json"
            index.write_text(index.read_text().replace("PNDMScheduler", scheduler_class.__name__))
            convert(str(source), root / "converted", quiet=True, preset="none")
            made[sampler] = source, root / "converted"
        return made[sampler]

    return model


@pytest.mark.parametrize("sampler", ["Euler", "Euler a"])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_trailing_euler_matches_diffusers(trailing_models, shared_noise, sampler, steps):
    """SD-Turbo and SDXL-Lightning run Euler (ancestral) with timestep_spacing="trailing", without guidance."""
    from diffusers import StableDiffusionPipeline

    source, converted = trailing_models(sampler)
    reference = _reference(StableDiffusionPipeline, source)
    expected = reference(
        PROMPT, num_inference_steps=steps, guidance_scale=0.0, height=SIZE, width=SIZE, output_type="np"
    ).images
    ours = Pipeline.load(converted)
    assert ours.default_sampler == sampler
    got = ours.txt2img(PROMPT, steps=steps, cfg_scale=0.0, seed=SEED, output_type="np", progress=False)
    _check(got, expected)


@pytest.mark.parametrize("sampler", ["DDIM", "Euler"])
def test_v_prediction_zero_snr_and_guidance_rescale_match_diffusers(models, tmp_path, shared_noise, sampler):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

    zero_snr = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
    folder = tmp_path / "zsnr"
    shutil.copytree(models / "tiny-sd2-v", folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **zero_snr}))
    scheduler_class = {"DDIM": DDIMScheduler, "Euler": EulerDiscreteScheduler}[sampler]
    reference = _reference(
        StableDiffusionPipeline, models / "tiny-sd2-v-src", lambda c: scheduler_class.from_config({**c, **zero_snr})
    )
    expected = reference(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=5,
        guidance_scale=7.5,
        guidance_rescale=0.7,
        height=SIZE,
        width=SIZE,
        output_type="np",
    ).images
    ours = Pipeline.load(folder)
    assert ours.folder.manifest.prediction_type == "v_prediction"
    common = dict(negative_prompt=NEGATIVE, steps=5, cfg_scale=7.5, sampler=sampler, seed=SEED, progress=False)
    got = ours.txt2img(PROMPT, cfg_rescale=0.7, output_type="np", **common)
    _check(got, expected)
    plain = ours.txt2img(PROMPT, output_type="np", **common)
    assert float(np.max(np.abs(plain - got))) > 1e-3  # the rescale really acts
    image = ours.txt2img(PROMPT, cfg_rescale=0.7, **common)[0]
    assert "CFG Rescale phi: 0.7" in image.info["parameters"]


def test_lcm_lora_fused_at_conversion_matches_diffusers(tiny_diffusers, tmp_path, shared_noise):
    """An LCM-LoRA (every U-Net linear and convolution, kohya keys) fused by ``sdlite convert --lora`` and run with
    the LCM sampler at CFG 1, against diffusers' load_lora_weights + fuse_lora."""
    pytest.importorskip("peft")
    from diffusers import LCMScheduler, StableDiffusionPipeline
    from safetensors.torch import save_file

    from sdlite.convert.converter import convert
    from sdlite.convert.lora import LoraSpec

    pipe = _reference(StableDiffusionPipeline, tiny_diffusers)
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, module in pipe.unet.named_modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            out_dim, in_dim, *kernel = module.weight.shape
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(4, in_dim, *kernel, generator=generator) * 0.1
            state[f"{key}.lora_up.weight"] = torch.randn(out_dim, 4, *([1] * len(kernel)), generator=generator) * 0.1
            state[f"{key}.alpha"] = torch.tensor(4.0)
    lora = tmp_path / "lcm-lora-tiny.safetensors"
    save_file(state, lora)
    convert(str(tiny_diffusers), tmp_path / "fused", quiet=True, loras=[LoraSpec(lora, 1.0)])

    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora()
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    expected = pipe(PROMPT, num_inference_steps=4, guidance_scale=1.0, height=SIZE, width=SIZE, output_type="np")
    ours = Pipeline.load(tmp_path / "fused")
    assert ours.defaults["sampler"] == "LCM"  # detected from the LoRA's name
    got = ours.txt2img(PROMPT, steps=4, cfg_scale=1.0, sampler="LCM", seed=SEED, output_type="np", progress=False)
    _check(got, expected.images)


def test_few_step_defaults_are_detected_written_and_used(models, tiny_diffusers, tmp_path):
    from sdlite.convert.converter import convert

    lcm = Pipeline.load(models / "tiny-lcm")
    assert lcm.folder.manifest.preset == "lcm"
    assert lcm.defaults == {"steps": 4, "cfg_scale": 8.0, "sampler": "LCM"}
    text = lcm.txt2img(PROMPT, seed=1, progress=False)[0].info["parameters"]
    assert "Steps: 4, Sampler: LCM" in text and "CFG scale: 8" in text
    # What the user gives wins over the model's defaults.
    text = lcm.txt2img(PROMPT, steps=2, cfg_scale=3.0, seed=1, progress=False)[0].info["parameters"]
    assert "Steps: 2, Sampler: LCM" in text and "CFG scale: 3" in text

    convert(str(tiny_diffusers), tmp_path / "turbo", quiet=True, preset="turbo")
    turbo = Pipeline.load(tmp_path / "turbo")
    text = turbo.txt2img(PROMPT, seed=1, progress=False)[0].info["parameters"]
    assert "Steps: 1, Sampler: Euler a, Schedule type: SGM Uniform, CFG scale: 1," in text
    # A sampler that cannot take the model's schedule runs its own.
    text = turbo.txt2img(PROMPT, sampler="DDIM", seed=1, progress=False)[0].info["parameters"]
    assert "Sampler: DDIM" in text
    assert Pipeline.load(models / "tiny").defaults == {}


def test_cli_few_step_options(models, tmp_path, capsys):
    from sdlite.cli import main

    out = tmp_path / "a.png"
    args = ["generate", PROMPT, "-m", str(models / "tiny"), "--vae", "taesd", "--steps", "3", "--seed", "1"]
    assert main([*args, "-n", NEGATIVE, "--cfg", "1", "--preview-every", "2", "-o", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.strip() == "warning: the negative prompt is not used: at CFG scale 1 (no unconditional pass)"
    assert out.is_file() and (tmp_path / "a.preview.png").is_file()
    assert main([*args, "--cfg-rescale", "2", "-o", str(out)]) == 2
    assert "--cfg-rescale 2.0: must be a number from 0 (off) to 1" in capsys.readouterr().err
    assert main([*args, "--preview-every", "-1", "-o", str(out)]) == 2
    assert main(["convert", str(models / "taesd"), str(tmp_path / "x"), "--preset", "fast"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith("--preset fast: not supported; this version supports auto, none, lcm, turbo, lightning")
    )
    assert not (tmp_path / "x").exists()


def test_turbo_default_size_is_the_distilled_one():
    """SDXL-Turbo generates at 512x512 by default (distilled there); SD-Turbo, Lightning and plain SDXL keep the
    U-Net's size."""
    from sdlite.convert.presets import default_side, model_defaults

    preset, _ = model_defaults("auto", {}, "sd_xl_turbo_1.0_fp16", [])
    assert preset == "turbo" and default_side("sdxl", preset, 1024) == 512
    assert default_side("sd2", "turbo", 512) == 512
    assert default_side("sdxl", "lightning", 1024) == default_side("sdxl", None, 1024) == 1024


# W8A8 tiny decoder against the float32 one, 0..1 pixels (random tiny weights: 0.04 here).
W8A8_DECODE_ATOL = 0.1


def test_tiny_vae_added_to_a_converted_folder(models, tiny_diffusers, all_precisions, tmp_path, capsys):
    """``sdlite add-tiny-vae`` converts TAESD into a folder converted without one, in the folder's formats (the
    decoder also in OpenVINO W8A8, calibrated on its encoder's latents of synthetic images, for a W8A8 folder),
    leaves the model's parts untouched, and decodes as a folder converted with ``--tiny-vae`` does; the W8A8
    pipeline decodes and previews with the W8A8 decoder; bad input changes nothing."""
    from sdlite.cli import main
    from sdlite.hashing import sha256_file

    folder = tmp_path / "plain"
    shutil.copytree(all_precisions, folder)
    before = {path: sha256_file(path) for path in folder.rglob("*") if path.is_file() and path.name != "sdlite.json"}
    manifest_before = (folder / "sdlite.json").read_text()

    assert main(["add-tiny-vae", str(folder), str(tiny_diffusers / "vae"), "--quiet"]) == 2
    assert "vae: AutoencoderKL, expected an AutoencoderTiny (TAESD)" in capsys.readouterr().err
    assert (folder / "sdlite.json").read_text() == manifest_before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["plain"]

    assert main(["add-tiny-vae", str(folder), str(models / "taesd"), "--quiet"]) == 0
    assert all(sha256_file(path) == digest for path, digest in before.items())
    manifest = json.loads((folder / "sdlite.json").read_text())
    assert manifest["tiny_vae"] == "taesd"
    floats = {(f, p) for f in ("onnx", "openvino") for p in ("fp32", "fp16")}
    for part, expected in (("taesd_encoder", floats), ("taesd_decoder", floats | {("openvino", "w8a8")})):
        assert {(v["format"], v["precision"]) for v in manifest["components"][part]} == expected
        assert all(v["validation"]["passed"] for v in manifest["components"][part])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["plain"]

    latents = NoiseGenerator(3).randn((1, 4, 8, 8))
    added = Pipeline.load(folder, vae="taesd", precision="fp32").vae.decode(latents)
    np.testing.assert_allclose(added, Pipeline.load(models / "tiny", vae="taesd").vae.decode(latents), atol=1e-6)

    w8a8 = Pipeline.load(folder, engine="openvino", precision="w8a8", vae="taesd")
    assert w8a8.parts.path("taesd_decoder").parent.name == "w8a8"
    latents = NoiseGenerator(3).randn((1, 4, 16, 16))
    float32 = Pipeline.load(folder, engine="openvino", precision="fp32", compute="f32", vae="taesd")
    expected = float32.vae.decode(latents)
    assert np.abs(w8a8.vae.decode(latents) - expected).max() < W8A8_DECODE_ATOL
    assert np.abs(np.asarray(w8a8.preview(latents)[0]) / 255 - expected[0]).max() < W8A8_DECODE_ATOL + 1 / 255

    # The bench's W8A8 row decodes with the W8A8 decoder; a peer gets the folder's fp16 one in place of its VAE's.
    report = tmp_path / "report"
    args = ["bench", "-m", str(folder), "--size", "64x64", "--steps", "2", "--cfg", "1", "--vae", "taesd"]
    args += ["--engine", "openvino", "--precision", "w8a8", "--warmup-steps", "0", "--gemm-size", "0", "--peers"]
    args += ["--source", str(tiny_diffusers), "--peer", "diffusers-torch fp32", "--report", str(report), "--quiet"]
    assert main(args) == 0
    rows = {row["name"]: row for row in json.loads((report / "report.json").read_text())["rows"]}
    assert rows["sdlite openvino w8a8 auto"]["status"] == "ok"
    assert rows["diffusers-torch fp32"]["note"] == "VAE decoder: OpenVINO TAESD fp16"

    assert main(["add-tiny-vae", str(folder), str(models / "taesd"), "--quiet"]) == 2
    assert "already has a tiny VAE (taesd); add --overwrite to replace it" in capsys.readouterr().err
    assert main(["add-tiny-vae", str(folder), str(models / "taesd"), "--quiet", "--overwrite", "--no-validate"]) == 0
    assert main(["add-tiny-vae", str(tmp_path / "nowhere"), str(models / "taesd")]) == 2
