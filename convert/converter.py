"""``sdlite convert``: a checkpoint in, a validated converted-model folder out (DESIGN.md layout)."""

from __future__ import annotations

import json
from pathlib import Path

from tqdm.auto import tqdm

from sdlite.convert.atomic import atomic_output_dir
from sdlite.convert.loading import load_checkpoint, quiet_diffusers
from sdlite.convert.onnx_export import export_onnx
from sdlite.convert.parts import PARTS, trace_size, vae_scale_factor, validation_size
from sdlite.convert.validate import ValidationError, validate_onnx
from sdlite.errors import InputError
from sdlite.hashing import sha256_file
from sdlite.manifest import COMPONENTS, Manifest, Variant

SUPPORTED_FORMATS = ("onnx",)
SUPPORTED_PRECISIONS = ("fp32",)
SUPPORTED_ATTENTION = ("plain",)


def _family(pipe) -> str:
    # SD 2.x conditions on OpenCLIP ViT-H (1024 wide); SD 1.x on CLIP ViT-L (768) and toy models below.
    return "sd2" if pipe.unet.config.cross_attention_dim == 1024 else "sd15"


def _check_choice(kind: str, requested: list[str], supported: tuple[str, ...]) -> None:
    unknown = [value for value in requested if value not in supported]
    if unknown:
        raise InputError(f"--{kind} {','.join(unknown)}: not supported; this version supports {', '.join(supported)}")


def _model_index(pipe) -> dict:
    """diffusers' model_index.json with optimum's ONNX pipeline component names."""
    index = {key: value for key, value in dict(pipe.config).items() if not key.startswith("_")}
    components = {
        "text_encoder": ["transformers", "CLIPTextModel"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae_encoder": ["diffusers", "AutoencoderKL"],
        "vae_decoder": ["diffusers", "AutoencoderKL"],
        "tokenizer": index.get("tokenizer", ["transformers", "CLIPTokenizer"]),
        "scheduler": index.get("scheduler", ["diffusers", "PNDMScheduler"]),
    }
    return {
        "_class_name": type(pipe).__name__,
        "_diffusers_version": pipe.config.get("_diffusers_version"),
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        **components,
    }


def _save_configs(pipe, folder: Path) -> None:
    pipe.tokenizer.save_pretrained(folder / "tokenizer")
    pipe.scheduler.save_pretrained(folder / "scheduler")
    pipe.text_encoder.config.to_json_file(folder / "text_encoder" / "config.json")
    pipe.unet.save_config(folder / "unet")
    pipe.vae.save_config(folder / "vae_encoder")
    pipe.vae.save_config(folder / "vae_decoder")
    (folder / "model_index.json").write_text(json.dumps(_model_index(pipe), indent=2) + "\n")


def convert(
    source: str,
    out: str | Path,
    formats: list[str] | None = None,
    precisions: list[str] | None = None,
    attention: str = "plain",
    validate: bool = True,
    allow_pickle: bool = False,
    quiet: bool = False,
    overwrite: bool = False,
) -> Manifest:
    """Export every part of ``source`` to ``out`` and validate each against PyTorch.

    The folder appears at ``out`` only once complete: it is built in a temporary sibling and renamed.
    Raises ``ValidationError`` (after checking every part) when an export is out of tolerance.
    """
    formats, precisions = formats or ["onnx"], precisions or ["fp32"]
    _check_choice("format", formats, SUPPORTED_FORMATS)
    _check_choice("precision", precisions, SUPPORTED_PRECISIONS)
    _check_choice("attention", [attention], SUPPORTED_ATTENTION)
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"{out}: output folder already exists; choose a new path or remove it")
    if not out.parent.exists():
        raise InputError(f"{out.parent}: folder does not exist; create it or choose another output path")

    if quiet:
        quiet_diffusers()
    loaded = load_checkpoint(source, allow_pickle=allow_pickle)
    pipe = loaded.pipe
    factor = vae_scale_factor(pipe)
    manifest = Manifest(
        family=_family(pipe),
        name=loaded.name,
        prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"),
        vae_scaling_factor=float(pipe.vae.config.scaling_factor),
        default_size=(pipe.unet.config.sample_size * factor,) * 2,
        source_sha256=loaded.sha256,
    )
    trace, check = trace_size(pipe), validation_size(pipe)
    failures = []
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        progress = tqdm(COMPONENTS, desc="convert", unit="part", disable=quiet)
        for name in progress:
            spec = PARTS[name]
            progress.set_postfix_str(name)
            module = spec.wrap(pipe)
            files = export_onnx(spec, module, spec.dummy_inputs(pipe, trace), tmp / name)
            validation = None
            if validate:
                result = validate_onnx(spec, module, spec.dummy_inputs(pipe, check), files[0])
                if not quiet:
                    tqdm.write(result.describe())
                validation = result.to_json()
                if not result.passed:
                    failures.append(result.describe())
            manifest.components[name] = [
                Variant(
                    format="onnx",
                    precision="fp32",
                    attention="plain",
                    files={str(f.relative_to(tmp)): sha256_file(f) for f in files},
                    validation=validation,
                )
            ]
        if failures:
            raise ValidationError("export out of tolerance: " + "; ".join(failures))
        _save_configs(pipe, tmp)
        manifest.write(tmp)
    return manifest
