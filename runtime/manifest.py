"""``sdlite.json``: what a converted-model folder holds, written by convert and read by the runtime.

Foreign folders (written by ``optimum-cli export onnx|openvino``) have no manifest; the runtime infers
the same facts from their files (see ``sdlite.model_folder``).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sdlite.layout import GRAPH_FILES, MANIFEST_NAME

# What the U-Net predicts (diffusers' prediction_type).
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

FORMAT_VERSION = 1
# Generation parameters a model's manifest may give defaults for.
DEFAULT_KEYS = ("steps", "cfg_scale", "sampler", "schedule")


@dataclass
class Variant:
    """One exported form of a component: format, weight precision, attention variant, token merging, files."""

    format: str  # "onnx" | "openvino"
    precision: str  # "fp32" | "fp16" | "int8"
    attention: str  # "plain" | "sliced" | "fused"
    files: dict[str, str]  # path relative to the folder -> sha256
    validation: dict | None = None  # max |diff| per output against PyTorch, tolerance, passed
    # Fraction of tokens merged before the U-Net's full-resolution self-attentions (ToMe; 0: none). It changes
    # the image, so the infotext records it as A1111's "Token merging ratio".
    token_merging: float = 0.0
    # The precision the files hold when it is not ``precision``: a part that overflows in fp16 (SDXL's VAE) is
    # kept in fp32 in its fp16 variant, and the runtime never computes it in fp16.
    kept: str | None = None

    @property
    def main_file(self) -> str:
        """The graph file (``model.onnx`` or ``openvino_model.xml``)."""
        return next(iter(self.files))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_KIND_NAMES = {dict: "an object", list: "a list", str: "a string", int: "a whole number"}


def _field(data: dict, key: str, kind: type | tuple[type, ...]):
    """``data[key]``, which must be there and of type ``kind``."""
    if key not in data:
        raise ValueError(f"{key}: missing")
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{key} {value!r}: expected {_KIND_NAMES.get(kind, 'a number')}")
    return value


def _variant(part: str, data: dict) -> Variant:
    """One variant of ``part`` from its JSON object, checked."""
    where = f"components.{part}"
    fmt = _field(data, "format", str)
    if fmt not in GRAPH_FILES:
        raise ValueError(f"{where}: format {fmt!r}: expected one of {', '.join(GRAPH_FILES)}")
    files = _field(data, "files", dict)
    if not files or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise ValueError(f"{where}: files: expected a non-empty map of file path to sha256")
    if any(Path(name).is_absolute() or ".." in Path(name).parts for name in files):
        raise ValueError(f"{where}: files: paths must stay inside the model folder")
    validation = data.get("validation")
    if validation is not None and not isinstance(validation, dict):
        raise ValueError(f"{where}: validation: expected an object")
    merging = data.get("token_merging", 0.0)
    if isinstance(merging, bool) or not isinstance(merging, (int, float)) or not 0 <= merging < 1:
        raise ValueError(f"{where}: token_merging {merging!r}: expected a fraction from 0 to below 1")
    return Variant(
        format=fmt,
        precision=_field(data, "precision", str),
        attention=_field(data, "attention", str),
        files=dict(files),
        validation=validation,
        token_merging=float(merging),
        kept=data.get("kept") if isinstance(data.get("kept"), str) else None,
    )


@dataclass
class Manifest:
    """The whole manifest."""

    family: str
    name: str
    prediction_type: str
    vae_scaling_factor: float
    default_size: tuple[int, int]
    source_sha256: str | None = None
    components: dict[str, list[Variant]] = field(default_factory=dict)
    # LoRAs fused into the weights at conversion, in order: name, sha256 (whole file), a1111_hash (sha256
    # of the tensor bytes, as A1111's "Lora hashes" infotext key uses), weight, layers.
    loras: list[dict] = field(default_factory=list)
    # The tiny autoencoder (TAESD) converted beside the VAE, by name, when there is one.
    tiny_vae: str | None = None
    # A few-step family (lcm, turbo, lightning) and the generation defaults it needs: any of steps, cfg_scale,
    # sampler, schedule; the runtime uses them where the user gives none.
    preset: str | None = None
    defaults: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        """A JSON-ready dict."""
        data = asdict(self)
        data["default_size"] = list(self.default_size)
        return data

    @classmethod
    def from_json(cls, data: dict) -> Manifest:
        """Parse the dict ``to_json`` wrote; raises ValueError naming the first field that is missing or of the
        wrong type or range."""
        if not isinstance(data, dict):
            raise ValueError("expected a JSON object")
        components = _field(data, "components", dict)
        for part, variants in components.items():
            if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
                raise ValueError(f"components.{part}: expected a list of variants")
        size = _field(data, "default_size", list)
        if len(size) != 2 or not all(_is_int(v) and v > 0 for v in size):
            raise ValueError(f"default_size {size!r}: expected [width, height], two positive whole numbers")
        scale = _field(data, "vae_scaling_factor", (int, float))
        if isinstance(scale, bool) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"vae_scaling_factor {scale!r}: expected a positive number")
        prediction = _field(data, "prediction_type", str)
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction!r}: expected one of {', '.join(PREDICTION_TYPES)}")
        source = data.get("source_sha256")
        if source is not None and not isinstance(source, str):
            raise ValueError(f"source_sha256 {source!r}: expected a hex string")
        loras = data.get("loras", [])
        if not isinstance(loras, list) or not all(
            isinstance(lora, dict) and isinstance(lora.get("name"), str) and isinstance(lora.get("a1111_hash"), str)
            for lora in loras
        ):
            raise ValueError("loras: expected a list of objects with a name and an a1111_hash")
        defaults = data.get("defaults", {})
        if not isinstance(defaults, dict) or not set(defaults) <= set(DEFAULT_KEYS):
            raise ValueError(f"defaults {defaults!r}: expected an object with some of {', '.join(DEFAULT_KEYS)}")
        preset = data.get("preset")
        if preset is not None and not isinstance(preset, str):
            raise ValueError(f"preset {preset!r}: expected a name")
        tiny_vae = data.get("tiny_vae")
        if tiny_vae is not None and not isinstance(tiny_vae, str):
            raise ValueError(f"tiny_vae {tiny_vae!r}: expected a name")
        return cls(
            family=_field(data, "family", str),
            name=_field(data, "name", str),
            prediction_type=prediction,
            vae_scaling_factor=float(scale),
            default_size=(int(size[0]), int(size[1])),
            source_sha256=source,
            components={part: [_variant(part, v) for v in variants] for part, variants in components.items()},
            loras=list(loras),
            tiny_vae=tiny_vae,
            preset=preset,
            defaults=dict(defaults),
            format_version=_field({"format_version": FORMAT_VERSION, **data}, "format_version", int),
        )

    def lora_hashes(self) -> str | None:
        """A1111's ``Lora hashes`` infotext value (``name: <12 hex>, ...``), or None without LoRAs."""
        if not self.loras:
            return None
        # A1111 strips ":" and "," from the names so that the list stays parseable.
        names = [str(lora["name"]).replace(":", "").replace(",", "") for lora in self.loras]
        return ", ".join(f"{name}: {lora['a1111_hash'][:12]}" for name, lora in zip(names, self.loras, strict=True))

    def write(self, folder: Path) -> None:
        """Write ``sdlite.json`` into ``folder`` atomically."""
        target = folder / MANIFEST_NAME
        tmp = target.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        os.replace(tmp, target)
