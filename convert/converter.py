"""``sdlite convert``: a checkpoint in, a validated converted-model folder out (optimum's folder layout)."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdlite.convert.attention import ATTENTION_VARIANTS, fuse_onnx_attention, set_attention
from sdlite.convert.calibration import CALIBRATION_MAX_CELLS, calibration_cells, calibration_inputs, tiny_decoder_inputs
from sdlite.convert.geglu import split_geglu
from sdlite.convert.journal import Journal, work_dir
from sdlite.convert.loading import TinyVae, load_checkpoint, load_tiny_vae, quiet_diffusers
from sdlite.convert.lora import LoraSpec, fuse_loras
from sdlite.convert.memory_plan import GB, Step, check_plan, default_budget, make_step
from sdlite.convert.onnx_export import export_onnx, save_onnx
from sdlite.convert.parts import final_layer_norm, part_spec, trace_size, vae_scale_factor, validation_size
from sdlite.convert.phases import PhaseMeter
from sdlite.convert.presets import CHOICES as PRESET_CHOICES
from sdlite.convert.presets import FAMILY_DEFAULTS, default_side, model_defaults
from sdlite.convert.token_merging import MAX_RATIO
from sdlite.convert.validate import ValidationError, reference_outputs, validate_graph
from sdlite.convert.variants import (
    FORMATS,
    PRECISIONS,
    derive,
    link_files,
    onnx_to_openvino,
    remove_steps_left,
    save_ir,
)
from sdlite.errors import InputError, SdliteError
from sdlite.layout import (
    CONFIG_NAME,
    FINAL_NORM_FILE,
    GRAPH_FILES,
    MODEL_INDEX,
    SAFETY_CHECKER,
    SCHEDULER_CONFIG,
    SDXL_FAMILIES,
    TEXT_ENCODER_2,
    TINY_VAE_DECODER,
    TINY_VAE_PARTS,
    TOKENIZER_2_DIR,
    TOKENIZER_DIR,
    family_of,
    family_parts,
    graph_files,
)
from sdlite.manifest import Manifest, Variant


def _check_choice(kind: str, requested: list[str], supported: tuple[str, ...]) -> None:
    unknown = [value for value in requested if value not in supported]
    if unknown:
        raise InputError(f"--{kind} {','.join(unknown)}: not supported; this version supports {', '.join(supported)}")


def _model_index(pipe, family: str, feature_extractor=None) -> dict:
    """diffusers' model_index.json with optimum's ONNX pipeline component names.

    The safety checker stays ``[null, null]`` even when the folder holds one: optimum-intel's
    OVStableDiffusionPipeline loads a listed ``safety_checker`` folder with PyTorch's ``from_pretrained``,
    which an ONNX/IR-only folder cannot satisfy. sdlite finds the checker through its manifest and files.
    SDXL's pipeline options (zero conditioning for an empty negative prompt, the refiner's aesthetic score) are
    kept: the runtime and optimum's pipelines read them."""
    index = {key: value for key, value in dict(pipe.config).items() if not key.startswith("_")}
    classes = {
        "text_encoder": ["transformers", "CLIPTextModel"],
        TEXT_ENCODER_2: ["transformers", "CLIPTextModelWithProjection"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae_encoder": ["diffusers", "AutoencoderKL"],
        "vae_decoder": ["diffusers", "AutoencoderKL"],
    }
    parts = family_parts(family)
    components = {name: classes[name] if name in parts else [None, None] for name in classes}
    components["tokenizer"] = index.get("tokenizer", ["transformers", "CLIPTokenizer"])
    if family in SDXL_FAMILIES:
        components["tokenizer_2"] = index.get("tokenizer_2", ["transformers", "CLIPTokenizer"])
        options = ("force_zeros_for_empty_prompt", "requires_aesthetics_score")
        components |= {key: index[key] for key in options if key in index}
    else:
        del components[TEXT_ENCODER_2]
    components["scheduler"] = index.get("scheduler", ["diffusers", "PNDMScheduler"])
    return {
        "_class_name": type(pipe).__name__,
        "_diffusers_version": pipe.config.get("_diffusers_version"),
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "feature_extractor": ["transformers", type(feature_extractor).__name__] if feature_extractor else [None, None],
        **components,
    }


def _save_configs(pipe, family: str, folder: Path, loaded=None, tiny: TinyVae | None = None) -> None:
    parts = family_parts(family)
    for part in parts:
        (folder / part).mkdir(parents=True, exist_ok=True)
    for part in TINY_VAE_PARTS if tiny is not None else ():
        tiny.vae.save_config(folder / part)
    for attribute, directory in (("tokenizer", TOKENIZER_DIR), ("tokenizer_2", TOKENIZER_2_DIR)):
        if getattr(pipe, attribute, None) is not None:
            getattr(pipe, attribute).save_pretrained(folder / directory)
    pipe.scheduler.save_pretrained(folder / SCHEDULER_CONFIG.parent)
    for encoder in (part for part in parts if part.startswith("text_encoder")):
        getattr(pipe, encoder).config.to_json_file(folder / encoder / CONFIG_NAME)
    pipe.unet.save_config(folder / "unet")
    pipe.vae.save_config(folder / "vae_encoder")
    pipe.vae.save_config(folder / "vae_decoder")
    feature_extractor = loaded.feature_extractor if loaded and loaded.safety_checker is not None else None
    if feature_extractor is not None:
        # The runtime's preprocessing for the safety checker reads preprocessor_config.json (sdlite.safety).
        feature_extractor.save_pretrained(folder / "feature_extractor")
        (folder / SAFETY_CHECKER).mkdir(exist_ok=True)
        loaded.safety_checker.config.to_json_file(folder / SAFETY_CHECKER / CONFIG_NAME)
    index = _model_index(pipe, family, feature_extractor)
    (folder / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _variant_dir(root: Path, part: str, precision: str, precisions: list[str]) -> Path:
    """The first requested precision sits in the part's folder (where optimum looks), others in a subfolder."""
    return root / part if precision == precisions[0] else root / part / precision


def _openvino_from_torch(spec, module, dummy: dict):
    """The part converted to an ``ov.Model`` straight from PyTorch (keeps fused SDPA ops)."""
    import openvino as ov
    import torch

    shapes = [
        ov.PartialShape([-1 if axis in spec.inputs[name] else dim for axis, dim in enumerate(dummy[name].shape)])
        for name in spec.inputs
    ]
    with torch.no_grad():
        model = ov.convert_model(module, example_input=tuple(dummy[n] for n in spec.inputs), input=shapes)
    for port, name in zip(model.inputs, spec.inputs, strict=True):
        port.get_tensor().set_names({name})
    for port, name in zip(model.outputs, spec.outputs, strict=True):
        port.get_tensor().set_names({name})
    return model


@dataclass
class _Part:
    """One part to convert: its spec, the object it is exported from, its jobs and attention."""

    spec: object
    source: object
    jobs: list[tuple[str, str]]
    precisions: list[str]
    attention: str
    weight_bytes: int
    # Of which convolution kernels (the memory plan's int8-IR validation unpacks them to float32).
    conv_bytes: int = 0
    # Kept in fp32 where fp16 is asked for: the part overflows in fp16 (SDXL's VAE: its config's force_upcast).
    fp16_overflows: bool = False


@dataclass
class _Base:
    """A part's fp32 exports and what its variants are checked against, as files in the work folder."""

    onnx: Path
    openvino: Path | None
    plain_onnx: Path | None
    check_inputs: dict[str, np.ndarray]
    reference: list[np.ndarray]
    calibration: list[dict[str, np.ndarray]] | None


def _weight_sizes(module) -> tuple[int, int]:
    """The module's weight bytes, and those of its convolution kernels."""
    sizes = [(p.numel() * p.element_size(), p.dim() == 4) for p in module.parameters()]
    return sum(size for size, _ in sizes), sum(size for size, conv in sizes if conv)


def _tiny_parts(tiny: TinyVae, formats: list[str], precisions: list[str]) -> dict[str, _Part]:
    """The tiny VAE's encoder and decoder, in fp32 and, when the model has a reduced precision, fp16 (its weights
    are a few MB: int8 weights would save nothing worth their error); with a W8A8 model, its decoder in OpenVINO
    W8A8 too (int8 activations halve the time of its full-resolution convolutions, which every preview runs)."""
    tiny_precisions = ["fp32", *(["fp16"] if set(precisions) - {"fp32"} else [])]
    jobs = [(fmt, precision) for precision in tiny_precisions for fmt in formats]
    sizes = _weight_sizes(tiny.vae)
    parts = {
        name: _Part(part_spec(name, tiny.vae), tiny.vae, jobs, tiny_precisions, "plain", *sizes)
        for name in TINY_VAE_PARTS
    }
    if "w8a8" in precisions and "openvino" in formats:
        decoder = parts[TINY_VAE_DECODER]
        decoder.jobs = [*jobs, ("openvino", "w8a8")]
        decoder.precisions = [*tiny_precisions, "w8a8"]
    return parts


# The parts whose ``w8a8`` variant has int8 activations; for the others it means int8 weights.
ACTIVATION_QUANTIZED_PARTS = ("unet", TINY_VAE_DECODER)


def _part_precision(part: str, precision: str) -> str:
    """The precision a part's ``precision`` variant is made in (``ACTIVATION_QUANTIZED_PARTS``)."""
    return "int8" if precision == "w8a8" and part not in ACTIVATION_QUANTIZED_PARTS else precision


def _calibrates(name: str, part: _Part) -> bool:
    """Whether the part needs W8A8 calibration samples."""
    return any(_part_precision(name, precision) == "w8a8" for _, precision in part.jobs)


def _save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **arrays)
    return path


def _load_calibration(path: Path) -> list[dict[str, np.ndarray]]:
    with np.load(path) as data:
        count = len({key.split("/")[0] for key in data.files})
        return [{key.split("/")[1]: data[key] for key in data.files if key.startswith(f"{i}/")} for i in range(count)]


@dataclass
class _Run:
    """One conversion in progress: its work folder and journal, its meter, and the choices that shape each step."""

    journal: Journal
    meter: PhaseMeter
    units: dict[tuple[str, str, str], float]
    pipe: object
    family: str
    loaded: object
    formats: list[str]
    token_merging: float
    validate: bool
    quiet: bool
    factor: int  # pixels per latent cell
    # The final layer norm the text encoder's variants carry (SD 1.x/2.x clip skip), None when it has none.
    norm: dict | None = None
    tiny: TinyVae | None = None

    def export_base(self, name: str, part: _Part, calibrate: bool) -> _Base:
        """The part's fp32 ONNX export (for OpenVINO with fused attention, its IR from PyTorch; with sliced, the
        plain graph), the PyTorch outputs its variants are validated against and, for a W8A8 U-Net or tiny
        decoder, the calibration samples: exported once, journaled."""
        journal, meter, pipe, formats = self.journal, self.meter, self.pipe, self.formats
        root, spec = journal.root, part.spec
        onnx_dir = (
            _variant_dir(root, name, "fp32", part.precisions)
            if "onnx" in formats and "fp32" in part.precisions
            else root / ".base" / name
        )
        ir_dir = root / ".base" / f"{name}-ir"
        plain_dir = root / ".base" / f"{name}-plain"
        arrays_dir = root / ".base" / f"{name}-arrays"
        record = journal.finished(f"{name}/base")
        if record is None:
            trace, check = trace_size(self.factor), validation_size(self.factor)
            module = spec.wrap(part.source)
            dummy = spec.dummy_inputs(part.source, trace)
            with meter.phase(name, "fp32", "export"):
                graph = export_onnx(spec, module, dummy, onnx_dir)[0]
                if part.attention == "fused" and "onnx" in formats and name == "unet":
                    # The U-Net holds the big attention layers (the VAE's single mid-block one is left as is).
                    save_onnx(fuse_onnx_attention(graph, 0, 0), graph)
                check_inputs = spec.dummy_inputs(part.source, check)
                inputs = {k: v.numpy() for k, v in check_inputs.items()}
                reference = reference_outputs(spec, module, check_inputs)
            files = graph_files(graph)
            if "openvino" in formats and part.attention == "fused":
                with meter.phase(name, "fp32 openvino", "convert"):
                    files += save_ir(_openvino_from_torch(spec, module, dummy), ir_dir)
            elif "openvino" in formats and part.attention == "sliced":
                # OpenVINO runs each attention in its own blocked kernel that never holds the whole score tensor,
                # so slicing by head only multiplies those kernels (SD 1.5 W8A8 U-Net at 512x512: 8x the kernels,
                # 0.4 GB more, slower): its IR is converted from the plain graph.
                with meter.phase(name, "fp32 plain", "export"):
                    set_attention(pipe, "plain", self.token_merging)
                    files += export_onnx(spec, module, dummy, plain_dir)
                    set_attention(pipe, "sliced", self.token_merging)
            del module
            arrays_dir.mkdir(parents=True, exist_ok=True)
            check_file = {f"input/{k}": v for k, v in inputs.items()}
            check_file.update({f"output/{i}": v for i, v in enumerate(reference)})
            files.append(_save_arrays(arrays_dir / "check.npz", check_file))
            if calibrate:
                with meter.phase(name, "w8a8", "calibrate"):
                    if name == TINY_VAE_DECODER:
                        samples = tiny_decoder_inputs(self.tiny.vae, self.tiny.calibration_cells * self.factor)
                    else:
                        # diffusers' own attention (PyTorch's SDPA, which never holds the score matrix: the full
                        # SD 1.5 U-Net at 512x512 peaks about 2 GB lower than with the plain processors) and no
                        # token merging: the samples are what the pipeline feeds its U-Net.
                        set_attention(pipe, "fused")
                        samples = calibration_inputs(pipe, self.quiet)
                        set_attention(pipe, part.attention, self.token_merging)
                flat = {f"{i}/{k}": v for i, sample in enumerate(samples) for k, v in sample.items()}
                files.append(_save_arrays(arrays_dir / "calibration.npz", flat))
            journal.record(f"{name}/base", files)
        with np.load(arrays_dir / "check.npz") as data:
            inputs = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith("input/")}
            reference = [data[f"output/{i}"] for i in range(len(spec.outputs))]
        calibration_file = arrays_dir / "calibration.npz"
        return _Base(
            onnx=onnx_dir / GRAPH_FILES["onnx"],
            openvino=ir_dir / GRAPH_FILES["openvino"] if "openvino" in formats else None,
            plain_onnx=plain_dir / GRAPH_FILES["onnx"]
            if part.attention == "sliced" and "openvino" in formats
            else None,
            check_inputs=inputs,
            reference=reference,
            calibration=_load_calibration(calibration_file) if calibrate else None,
        )

    def convert_base_to_openvino(self, name: str, part: _Part, base: _Base) -> None:
        """Write the fp32 IR the part's OpenVINO variants derive from (journaled), once its PyTorch module has
        been released: converting the U-Net beside it would add its 3.4 GB of pages to the conversion's peak.
        (A fused-attention IR comes straight from PyTorch with the export.)"""
        if part.attention == "fused" or self.journal.finished(f"{name}/ir") is not None:
            return
        with self.meter.phase(name, "fp32 openvino", "convert"):
            model = onnx_to_openvino(base.plain_onnx or base.onnx)
            files = save_ir(model, base.openvino.parent)
            del model
        self.journal.record(f"{name}/ir", files)

    def run_parts(self, parts: dict[str, _Part]) -> dict:
        """Run every part's steps (the body of :func:`convert`); returns the manifest's components."""
        journal, meter, units, pipe = self.journal, self.meter, self.units, self.pipe
        root, norm = journal.root, self.norm
        # The PyTorch module each part exports from, released once its last part has its exports.
        last_user = {"text_encoder": "unet", TEXT_ENCODER_2: "unet", "unet": "unet", "vae": "vae_decoder"}
        components, failures = {}, []
        for name, part in parts.items():
            # A part whose variants are all finished (a resumed conversion) needs no exports any more.
            done = all(journal.finished(f"{name}/{fmt}/{precision}") is not None for fmt, precision in part.jobs)
            base = None if done else self.export_base(name, part, _calibrates(name, part))
            meter.advance(units[(name, "fp32", "export")] + units.get((name, "w8a8", "calibrate"), 0))
            # The part's module (or the wrapper around it) goes with its export; the pipeline keeps a module
            # only until its last part is exported (the U-Net's calibration runs the text encoder).
            part.source = None
            for module_name, user in last_user.items():
                if user == name:
                    setattr(pipe, module_name, None)
            if name == SAFETY_CHECKER:
                self.loaded.safety_checker = None
            if base is not None and base.openvino is not None:
                self.convert_base_to_openvino(name, part, base)
            meter.advance(units.get((name, "fp32 openvino", "openvino"), 0))
            variants = []
            for fmt, precision in part.jobs:
                label = f"{fmt} {precision}"
                part_precision = _part_precision(name, precision)
                kept = "fp32" if part.fp16_overflows and part_precision == "fp16" else None
                part_precision = kept or part_precision
                record = journal.finished(f"{name}/{fmt}/{precision}")
                if record is None:
                    target_dir = _variant_dir(root, name, precision, part.precisions)
                    phase = "quantize" if part_precision in ("int8", "w8a8") else "convert"
                    with meter.phase(name, label, phase):
                        if fmt == "onnx" and precision == "fp32":
                            files = graph_files(base.onnx)
                        elif fmt == "onnx" and part_precision == "fp32":
                            files = link_files(graph_files(base.onnx), target_dir)
                        else:
                            source_graph = base.openvino if fmt == "openvino" else base.onnx
                            calibration = base.calibration if part_precision == "w8a8" else None
                            # Intermediate files in .base, which goes with the work folder's other leftovers
                            # when the conversion ends (also after a kill and --resume).
                            files = derive(
                                fmt, part_precision, source_graph, target_dir, calibration, self.quiet, root / ".base"
                            )
                    if name == "text_encoder" and norm is not None:
                        # Clip skip applies the final layer norm to an earlier layer at run time (see
                        # sdlite.conditioning); each variant folder gets its own copy so it stands alone.
                        norm_file = files[0].parent / FINAL_NORM_FILE
                        np.savez(norm_file, **norm)
                        files = [*files, norm_file]
                    validation = None
                    if self.validate:
                        with meter.phase(name, label, "validate"):
                            result = validate_graph(
                                part.spec, files[0], base.check_inputs, base.reference, part_precision, label
                            )
                        meter.write(result.describe())
                        validation = result.to_json()
                    attention = "plain" if fmt == "openvino" and part.attention == "sliced" else part.attention
                    record = journal.record(
                        f"{name}/{fmt}/{precision}",
                        files,
                        validation=validation,
                        attention=attention,
                        token_merging=self.token_merging if name == "unet" else 0.0,
                        kept=kept,
                    )
                if record["validation"] is not None and not record["validation"]["passed"]:
                    failures.append(f"{name} {label}: out of tolerance ({record['validation']['bound']})")
                variants.append(
                    Variant(
                        format=fmt,
                        precision=precision,
                        attention=record["attention"],
                        files=record["files"],
                        validation=record["validation"],
                        token_merging=record["token_merging"],
                        kept=record.get("kept"),
                    )
                )
                meter.advance(
                    sum(
                        units.get((name, label, kind), 0)
                        for kind in (_kind(name, fmt, precision), _validate_kind(name, fmt, precision))
                    )
                )
            components[name] = variants
            # Its fp32 exports (an SDXL U-Net's ONNX graph and IR: 20 GB) leave the disk with the part; the
            # variants made from them are hard links or files of their own.
            for scratch in (f"{name}", f"{name}-ir", f"{name}-plain", f"{name}-arrays"):
                shutil.rmtree(root / ".base" / scratch, ignore_errors=True)
        if failures:
            raise ValidationError("export out of tolerance: " + "; ".join(failures))
        return components


class ConversionStopped(SdliteError):
    """A conversion stopped before the end; its finished steps are kept for ``--resume``."""

    exit_code = 130


def _kind(part: str, fmt: str, precision: str) -> str:
    """The kind of work (``sdlite.convert.memory_plan.STEP_COST``) that makes variant (fmt, precision) from the
    part's fp32 exports."""
    if precision == "fp32":
        return "link"
    if fmt == "onnx":
        return f"onnx-{precision}"
    return "openvino" if precision == "fp16" else _part_precision(part, precision)


def _validate_kind(part: str, fmt: str, precision: str) -> str:
    """The kind of work that validates variant (fmt, precision): an OpenVINO IR with int8 weights costs the most,
    as float32 arithmetic unpacks its convolution weights to float32 beside the compiled copy."""
    return "validate-int8-ir" if fmt == "openvino" and _part_precision(part, precision) == "int8" else "validate"


def _plan(parts: dict[str, _Part], formats: list[str], latent_cells: int, validate: bool) -> list[Step]:
    """Every step of the conversion with its estimated peak and time (see ``sdlite.convert.memory_plan``)."""
    steps = []
    for name, part in parts.items():
        w, c = part.weight_bytes, part.conv_bytes
        steps.append(make_step(name, "fp32", "export", w))
        if _calibrates(name, part):
            steps.append(make_step(name, "w8a8", "calibrate", w, latent_cells))
        if "openvino" in formats:
            steps.append(make_step(name, "fp32 openvino", "openvino", w))
        for fmt, precision in part.jobs:
            label = f"{fmt} {precision}"
            steps.append(make_step(name, label, _kind(name, fmt, precision), w, latent_cells, c))
            if validate:
                steps.append(make_step(name, label, _validate_kind(name, fmt, precision), w, conv_bytes=c))
    return steps


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
    memory_budget_gb: float | None = None,
    resume: bool = False,
    verbose: bool = False,
    tiny_vae: str | None = None,
    preset: str = "auto",
) -> Manifest:
    """Export every part of ``source`` to ``out`` in each format and precision, validating each against
    PyTorch.

    One part at a time, one variant at a time, everything freed between steps, so the peak is the largest
    step's; a plan whose largest step would not fit ``memory_budget_gb`` (default: the memory free now) is
    refused before any work. The folder is built in a work folder beside ``out`` and renamed once complete;
    an interrupted conversion keeps its finished steps there and ``resume`` continues from them
    (``sdlite.convert.journal``). Raises ``ValidationError`` (after checking every variant) when an export is
    out of tolerance. ``loras`` are fused into the U-Net and text encoder weights first (see
    ``sdlite.convert.lora``). ``token_merging`` > 0 merges that fraction of the tokens before the U-Net's
    full-resolution self-attentions (ToMe, see ``sdlite.convert.token_merging``): faster, and a different
    image. ``verbose`` prints each phase's seconds and peak memory at the end (otherwise only the largest).
    ``tiny_vae`` (an AutoencoderTiny folder or hub id: TAESD) is converted beside the VAE, in fp32 and, when a
    reduced precision is asked for, fp16, its decoder also in W8A8 with W8A8 (``_tiny_parts``).
    ``preset`` names the few-step family whose generation defaults go into the manifest ("auto": detected, see
    ``sdlite.convert.presets``).
    """
    formats, precisions = formats or ["onnx"], precisions or ["fp32"]
    _check_choice("format", formats, FORMATS)
    _check_choice("precision", precisions, PRECISIONS)
    _check_choice("attention", [attention], ATTENTION_VARIANTS)
    _check_choice("preset", [preset], PRESET_CHOICES)
    if not 0 <= token_merging <= MAX_RATIO:
        raise InputError(f"--token-merging {token_merging}: must be between 0 (off) and {MAX_RATIO}")
    if "w8a8" in precisions and "openvino" not in formats:
        raise InputError("--precision w8a8 quantizes activations with OpenVINO; add --format openvino")
    if memory_budget_gb is not None and not memory_budget_gb > 0:
        raise InputError(f"--memory-budget {memory_budget_gb}: must be a number of gigabytes above 0")
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
    # Weights are memory-mapped, not read: a part's pages come in when it is exported.
    loaded = load_checkpoint(source, allow_pickle=allow_pickle, scratch_parent=out.parent, quiet=quiet)
    pipe = loaded.pipe
    family_preset, defaults = model_defaults(preset, pipe.unet.config, loaded.name, [s.path for s in loras or []])
    lora_records = fuse_loras(pipe, loras or [], allow_pickle=allow_pickle)
    cells = calibration_cells(pipe.unet.config.sample_size)
    tiny = load_tiny_vae(tiny_vae, pipe.vae.config.latent_channels, cells) if tiny_vae else None
    factor = vae_scale_factor(pipe)
    family = family_of(pipe.unet.config, getattr(pipe, "text_encoder", None) is not None)
    defaults = {**FAMILY_DEFAULTS.get(family, {}), **defaults}
    manifest = Manifest(
        family=family,
        name=loaded.name,
        prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"),
        vae_scaling_factor=float(pipe.vae.config.scaling_factor),
        default_size=(default_side(family, family_preset, pipe.unet.config.sample_size * factor),) * 2,
        source_sha256=loaded.sha256,
        loras=lora_records,
        tiny_vae=tiny.name if tiny else None,
        preset=family_preset,
        defaults=defaults,
    )
    set_attention(pipe, attention, token_merging)
    split_geglu(pipe.unet)
    jobs = [
        (fmt, precision) for precision in precisions for fmt in formats if not (fmt == "onnx" and precision == "w8a8")
    ]
    # Sizes only: a reference to a module here would keep it loaded after its part is done.
    names = family_parts(family)
    weights = {name: _weight_sizes(getattr(pipe, "vae" if name.startswith("vae") else name)) for name in names}
    # SDXL's VAE overflows in fp16 (its config's force_upcast, which diffusers honours by decoding in fp32).
    overflows = bool(getattr(pipe.vae.config, "force_upcast", False)) and family in SDXL_FAMILIES
    parts = {name: _Part(part_spec(name, pipe), pipe, jobs, precisions, attention, *weights[name]) for name in names}
    for name in ("vae_encoder", "vae_decoder"):
        parts[name].fp16_overflows = overflows
    if loaded.safety_checker is not None:
        # The safety checker only decides whether to black an image out: it is exported in fp32 only, in
        # each format, so that a reduced precision can never flip its decision near a threshold.
        checker = loaded.safety_checker
        parts[SAFETY_CHECKER] = _Part(
            part_spec(SAFETY_CHECKER, checker),
            checker,
            [(fmt, "fp32") for fmt in formats],
            ["fp32"],
            "plain",
            *_weight_sizes(checker),
        )
    if tiny is not None:
        parts |= _tiny_parts(tiny, formats, precisions)
    steps = _plan(parts, formats, cells**2, validate)
    budget = memory_budget_gb * GB if memory_budget_gb is not None else default_budget()
    check_plan(steps, budget, given=memory_budget_gb is not None)

    options = {
        "source": str(Path(source).resolve()) if Path(source).exists() else source,
        "source_sha256": loaded.sha256,
        "formats": formats,
        "precisions": precisions,
        "attention": attention,
        "validate": validate,
        "loras": lora_records,
        "token_merging": token_merging,
        "tiny_vae": tiny.name if tiny else None,
    }
    journal = Journal(work_dir(out), options, resume)
    remove_steps_left(journal.root / ".base")
    meter = PhaseMeter(sum(step.seconds for step in steps), quiet)
    units = {(step.part, step.variant, step.kind): step.seconds for step in steps}
    try:
        # Configs first, while every module is still there to describe itself (modules are freed as parts finish).
        _save_configs(pipe, family, journal.root, loaded, tiny)
        # SD 1.x/2.x clip skip normalises an earlier layer with the final layer norm; SDXL uses layers unnormalised.
        norm = final_layer_norm(pipe.text_encoder) if family not in SDXL_FAMILIES else None
        run = _Run(
            journal, meter, units, pipe, family, loaded, formats, token_merging, validate, quiet, factor, norm, tiny
        )
        manifest.components = run.run_parts(parts)
    except BaseException as exc:
        meter.close()
        if isinstance(exc, (InputError, ValidationError)) or not journal.steps:
            # Nothing worth resuming: the same input fails the same way, or nothing had finished.
            shutil.rmtree(journal.root, ignore_errors=True)
            if isinstance(exc, KeyboardInterrupt):
                raise ConversionStopped("interrupted") from None
            raise
        kept = (
            f"the {len(journal.steps)} finished steps are kept in {journal.root}: run the same command with "
            "--resume to continue"
        )
        if isinstance(exc, KeyboardInterrupt):
            raise ConversionStopped(f"interrupted; {kept}") from None
        print(f"sdlite convert: {kept}", file=sys.stderr)
        raise
    meter.close()
    shutil.rmtree(journal.root / ".base", ignore_errors=True)
    manifest.write(journal.root)
    journal.forget()
    if out.exists():
        shutil.rmtree(out)
    journal.root.rename(out)
    if not quiet:
        print(meter.table() if verbose else meter.summary())
    return manifest


def add_tiny_vae(
    folder: str | Path, tiny_vae: str, validate: bool = True, quiet: bool = False, overwrite: bool = False
) -> Manifest:
    """Convert ``tiny_vae`` (an AutoencoderTiny folder or hub id: TAESD) into the converted-model ``folder``, in
    the folder's formats, as :func:`convert` with ``tiny_vae`` would have: the model's parts are left as they are.

    The tiny VAE's parts are built in a work folder beside ``folder``, moved in when all are done and validated,
    and the manifest is rewritten last (atomically), so an interrupted run leaves the folder as it was.
    ``overwrite`` replaces a tiny VAE the folder already has."""
    from sdlite.model_folder import ModelFolder

    opened = ModelFolder.open(folder)
    folder, manifest = opened.path, opened.manifest
    if manifest.tiny_vae and not overwrite:
        raise InputError(f"{folder}: already has a tiny VAE ({manifest.tiny_vae}); add --overwrite to replace it")
    if quiet:
        quiet_diffusers()
    cells = calibration_cells(opened.part_config("unet").get("sample_size", CALIBRATION_MAX_CELLS))
    tiny = load_tiny_vae(tiny_vae, opened.part_config("vae_decoder").get("latent_channels", 4), cells)
    variants = [variant for part in family_parts(manifest.family) for variant in manifest.components.get(part, [])]
    formats = [fmt for fmt in FORMATS if any(variant.format == fmt for variant in variants)]
    precisions = sorted({variant.precision for variant in variants})
    parts = _tiny_parts(tiny, formats, precisions)
    # The only calibrated step here is the tiny decoder's, at the model's own latent size (``_Run.export_base``).
    steps = _plan(parts, formats, cells**2, validate)
    check_plan(steps, default_budget(), given=False)

    root = folder.parent / f".{folder.name}.sdlite-tiny-vae"
    factor = opened.latent_factor
    journal = Journal(root, {"tiny_vae": tiny.name}, resume=False)
    meter = PhaseMeter(sum(step.seconds for step in steps), quiet)
    units = {(step.part, step.variant, step.kind): step.seconds for step in steps}
    try:
        for name in TINY_VAE_PARTS:
            tiny.vae.save_config(root / name)
        run = _Run(journal, meter, units, None, manifest.family, None, formats, 0.0, validate, quiet, factor, tiny=tiny)
        components = run.run_parts(parts)
    except BaseException:
        meter.close()
        shutil.rmtree(root, ignore_errors=True)
        raise
    meter.close()
    replaced = root / ".replaced"
    replaced.mkdir()
    for name in TINY_VAE_PARTS:
        if (folder / name).exists():
            (folder / name).rename(replaced / name)
        (root / name).rename(folder / name)
    manifest.components.update(components)
    manifest.tiny_vae = tiny.name
    manifest.write(folder)
    shutil.rmtree(root, ignore_errors=True)
    return manifest
