"""``sdlite convert``: a checkpoint in, a validated converted-model folder out (optimum's folder layout)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from sdlite.convert.atomic import atomic_output_dir
from sdlite.convert.attention import ATTENTION_VARIANTS, fuse_onnx_attention, set_attention
from sdlite.convert.calibration import calibration_inputs
from sdlite.convert.geglu import split_geglu
from sdlite.convert.loading import load_checkpoint, quiet_diffusers
from sdlite.convert.lora import LoraSpec, fuse_loras
from sdlite.convert.onnx_export import export_onnx, save_onnx
from sdlite.convert.parts import final_layer_norm, part_spec, trace_size, vae_scale_factor, validation_size
from sdlite.convert.token_merging import MAX_RATIO
from sdlite.convert.validate import ValidationError, reference_outputs, validate_graph
from sdlite.convert.variants import FORMATS, PRECISIONS, derive
from sdlite.errors import InputError
from sdlite.hashing import sha256_file
from sdlite.layout import (
    CONFIG_NAME,
    FINAL_NORM_FILE,
    MODEL_INDEX,
    PARTS,
    SAFETY_CHECKER,
    SCHEDULER_CONFIG,
    TOKENIZER_DIR,
    family_of,
    graph_files,
)
from sdlite.manifest import Manifest, Variant


def _check_choice(kind: str, requested: list[str], supported: tuple[str, ...]) -> None:
    unknown = [value for value in requested if value not in supported]
    if unknown:
        raise InputError(f"--{kind} {','.join(unknown)}: not supported; this version supports {', '.join(supported)}")


def _model_index(pipe, feature_extractor=None) -> dict:
    """diffusers' model_index.json with optimum's ONNX pipeline component names.

    The safety checker stays ``[null, null]`` even when the folder holds one: optimum-intel's
    OVStableDiffusionPipeline loads a listed ``safety_checker`` folder with PyTorch's ``from_pretrained``,
    which an ONNX/IR-only folder cannot satisfy. sdlite finds the checker through its manifest and files."""
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
        "feature_extractor": ["transformers", type(feature_extractor).__name__] if feature_extractor else [None, None],
        **components,
    }


def _save_configs(pipe, folder: Path, loaded=None) -> None:
    pipe.tokenizer.save_pretrained(folder / TOKENIZER_DIR)
    pipe.scheduler.save_pretrained(folder / SCHEDULER_CONFIG.parent)
    pipe.text_encoder.config.to_json_file(folder / "text_encoder" / CONFIG_NAME)
    pipe.unet.save_config(folder / "unet")
    pipe.vae.save_config(folder / "vae_encoder")
    pipe.vae.save_config(folder / "vae_decoder")
    feature_extractor = loaded.feature_extractor if loaded and loaded.safety_checker is not None else None
    if feature_extractor is not None:
        # The runtime's preprocessing for the safety checker reads preprocessor_config.json (sdlite.safety).
        feature_extractor.save_pretrained(folder / "feature_extractor")
        loaded.safety_checker.config.to_json_file(folder / SAFETY_CHECKER / CONFIG_NAME)
    (folder / MODEL_INDEX).write_text(json.dumps(_model_index(pipe, feature_extractor), indent=2) + "\n")


def _variant_dir(root: Path, part: str, precision: str, precisions: list[str]) -> Path:
    """The first requested precision sits in the part's folder (where optimum looks), others in a subfolder."""
    return root / part if precision == precisions[0] else root / part / precision


def _openvino_from_torch(spec, module, dummy: dict):
    """A function returning the part converted to OpenVINO straight from PyTorch (keeps fused SDPA ops)."""

    def build():
        import openvino as ov

        shapes = [
            ov.PartialShape([-1 if axis in spec.inputs[name] else dim for axis, dim in enumerate(dummy[name].shape)])
            for name in spec.inputs
        ]
        with torch_no_grad():
            model = ov.convert_model(module, example_input=tuple(dummy[n] for n in spec.inputs), input=shapes)
        for port, name in zip(model.inputs, spec.inputs, strict=True):
            port.get_tensor().set_names({name})
        for port, name in zip(model.outputs, spec.outputs, strict=True):
            port.get_tensor().set_names({name})
        return model

    return build


def torch_no_grad():
    """``torch.no_grad()``, imported late so that this module loads without torch for --help."""
    import torch

    return torch.no_grad()


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
    loras: list[LoraSpec] | None = None,
    token_merging: float = 0.0,
) -> Manifest:
    """Export every part of ``source`` to ``out`` in each format and precision, validating each against
    PyTorch.

    The folder appears at ``out`` only once complete: it is built in a temporary sibling and renamed.
    Raises ``ValidationError`` (after checking every variant) when an export is out of tolerance.
    ``loras`` are fused into the U-Net and text encoder weights first (see ``sdlite.convert.lora``).
    ``token_merging`` > 0 merges that fraction of the tokens before the U-Net's full-resolution
    self-attentions (ToMe, see ``sdlite.convert.token_merging``): faster, and a different image.
    """
    formats, precisions = formats or ["onnx"], precisions or ["fp32"]
    _check_choice("format", formats, FORMATS)
    _check_choice("precision", precisions, PRECISIONS)
    _check_choice("attention", [attention], ATTENTION_VARIANTS)
    if not 0 <= token_merging <= MAX_RATIO:
        raise InputError(f"--token-merging {token_merging}: must be between 0 (off) and {MAX_RATIO}")
    if "w8a8" in precisions and "openvino" not in formats:
        raise InputError("--precision w8a8 quantizes activations with OpenVINO; add --format openvino")
    out = Path(out)
    if out.exists() and not overwrite:
        raise InputError(f"{out}: output folder already exists; choose a new path or remove it")
    if not out.parent.exists():
        raise InputError(f"{out.parent}: folder does not exist; create it or choose another output path")

    if quiet:
        quiet_diffusers()
    missing = [str(spec.path) for spec in loras or [] if not spec.path.is_file()]
    if missing:
        raise InputError(f"--lora {missing[0]}: file not found")
    loaded = load_checkpoint(source, allow_pickle=allow_pickle)
    pipe = loaded.pipe
    lora_records = fuse_loras(pipe, loras or [], allow_pickle=allow_pickle)
    factor = vae_scale_factor(pipe)
    manifest = Manifest(
        family=family_of(pipe.unet.config.cross_attention_dim),
        name=loaded.name,
        prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"),
        vae_scaling_factor=float(pipe.vae.config.scaling_factor),
        default_size=(pipe.unet.config.sample_size * factor,) * 2,
        source_sha256=loaded.sha256,
        loras=lora_records,
    )
    calibration = calibration_inputs(pipe, quiet) if "w8a8" in precisions else None
    set_attention(pipe, attention, token_merging)
    split_geglu(pipe.unet)
    trace, check = trace_size(pipe), validation_size(pipe)
    jobs = [
        (fmt, precision) for precision in precisions for fmt in formats if not (fmt == "onnx" and precision == "w8a8")
    ]
    # Per part: the module it is exported from, its (format, precision) jobs, its precisions, its attention.
    parts = {name: (pipe, jobs, precisions, attention) for name in PARTS}
    if loaded.safety_checker is not None:
        # The safety checker only decides whether to black an image out: it is exported in fp32 only, in
        # each format, so that a reduced precision can never flip its decision near a threshold.
        parts[SAFETY_CHECKER] = (loaded.safety_checker, [(fmt, "fp32") for fmt in formats], ["fp32"], "plain")
    failures = []
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        steps = sum(1 + len(part[1]) for part in parts.values())
        progress = tqdm(total=steps, desc="convert", unit="step", disable=quiet)
        for name, (source_model, part_jobs, part_precisions, part_attention) in parts.items():
            spec = part_spec(name, source_model)
            module = spec.wrap(source_model)
            progress.set_postfix_str(f"{name} onnx export")
            exports_onnx_fp32 = "onnx" in formats and "fp32" in part_precisions
            base_dir = _variant_dir(tmp, name, "fp32", part_precisions) if exports_onnx_fp32 else tmp / ".base" / name
            dummy = spec.dummy_inputs(source_model, trace)
            base = export_onnx(spec, module, dummy, base_dir)[0]
            if attention == "fused" and "onnx" in formats and name == "unet":
                # The U-Net holds the big attention layers (the VAE's single mid-block one is left as is).
                save_onnx(fuse_onnx_attention(base, 0, 0), base)
            openvino_base = base
            if part_attention == "sliced" and "openvino" in formats:
                # OpenVINO runs each attention in its own blocked kernel that never holds the whole score
                # tensor, so slicing by head only multiplies those kernels (SD 1.5 W8A8 U-Net at 512x512: 8x
                # the kernels, 0.4 GB more, slower; README): its IR is converted from the plain graph.
                set_attention(pipe, "plain", token_merging)
                openvino_base = export_onnx(spec, module, dummy, tmp / ".base" / f"{name}-plain")[0]
                set_attention(pipe, "sliced", token_merging)
            progress.update()
            check_inputs = spec.dummy_inputs(source_model, check)
            reference = reference_outputs(spec, module, check_inputs) if validate else None
            variants = []
            for fmt, precision in part_jobs:
                progress.set_postfix_str(f"{name} {fmt} {precision}")
                # Only the U-Net gets int8 activations; the other parts take int8 weights.
                part_precision = "int8" if precision == "w8a8" and name != "unet" else precision
                target_dir = _variant_dir(tmp, name, precision, part_precisions)
                if fmt == "onnx" and precision == "fp32":
                    files = graph_files(base)
                else:
                    source_graph = base
                    if fmt == "openvino":
                        source_graph = (
                            _openvino_from_torch(spec, module, dummy) if part_attention == "fused" else openvino_base
                        )
                    files = derive(
                        fmt, part_precision, source_graph, target_dir, calibration if name == "unet" else None
                    )
                if name == "text_encoder":
                    # Clip skip applies the final layer norm to an earlier layer at run time (see
                    # sdlite.conditioning); each variant folder gets its own copy so it stands alone.
                    norm_file = files[0].parent / FINAL_NORM_FILE
                    np.savez(norm_file, **final_layer_norm(pipe))
                    files = [*files, norm_file]
                validation = None
                if validate:
                    result = validate_graph(
                        spec, files[0], check_inputs, reference, part_precision, f"{fmt} {precision}"
                    )
                    if not quiet:
                        tqdm.write(result.describe())
                    validation = result.to_json()
                    if not result.passed:
                        failures.append(result.describe())
                variants.append(
                    Variant(
                        format=fmt,
                        precision=precision,
                        attention="plain" if fmt == "openvino" and part_attention == "sliced" else part_attention,
                        files={str(f.relative_to(tmp)): sha256_file(f) for f in files},
                        validation=validation,
                        token_merging=token_merging if name == "unet" else 0.0,
                    )
                )
                progress.update()
            manifest.components[name] = variants
        progress.close()
        shutil.rmtree(tmp / ".base", ignore_errors=True)
        if failures:
            raise ValidationError("export out of tolerance: " + "; ".join(failures))
        _save_configs(pipe, tmp, loaded)
        manifest.write(tmp)
    return manifest
