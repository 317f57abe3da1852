"""Open a converted-model folder: sdlite's own (with ``sdlite.json``) or one written by optimum-cli."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from sdlite.errors import InputError
from sdlite.hashing import sha256_file
from sdlite.layout import (
    CONFIG_NAME,
    DEFAULT_VAE_SCALING,
    GRAPH_FILES,
    LATENT_CHANNELS,
    MANIFEST_NAME,
    MODEL_INDEX,
    PARTS,
    SAFETY_CHECKER,
    SCHEDULER_CONFIG,
    SDXL_FAMILIES,
    TEXT_ENCODER_2,
    TOKENIZER_2_DIR,
    TOKENIZER_DIR,
    family_of,
    vae_factor,
)
from sdlite.manifest import Manifest, Variant
from sdlite.tokenizer import CLIPTokenizer


def _read_json(path: Path) -> dict:
    """A JSON object from ``path``; InputError when the file is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_counts(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(_is_count(v) for v in value)


def _is_heads(value: object) -> bool:
    return value is None or _is_count(value) or _is_counts(value)


def _is_names(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _is_positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


# Config keys the runtime reads, what each must be, and the check.
_CONFIG_CHECKS = {
    "in_channels": ("a positive whole number", _is_count),
    "sample_size": ("a positive whole number", _is_count),
    "cross_attention_dim": ("a positive whole number", _is_count),
    "hidden_size": ("a positive whole number", _is_count),
    "block_out_channels": ("a list of positive whole numbers", _is_counts),
    "attention_head_dim": ("a positive whole number or a list of them", _is_heads),
    "num_attention_heads": ("a positive whole number, a list of them or null", _is_heads),
    "down_block_types": ("a list of block names", _is_names),
    "scaling_factor": ("a positive number", _is_positive),
}


def _part_config(folder: Path, part: str) -> dict:
    """A part's ``config.json`` ({} when the folder has none), the keys the runtime reads checked."""
    path = folder / part / CONFIG_NAME
    if not path.is_file():
        return {}
    config = _read_json(path)
    for key, (expected, valid) in _CONFIG_CHECKS.items():
        if key in config and not valid(config[key]):
            raise InputError(f"{path}: {key} {config[key]!r}: expected {expected}")
    return config


def _infer_manifest(folder: Path) -> Manifest:
    """Describe a folder without ``sdlite.json`` (e.g. from ``optimum-cli export``) from its files."""
    components: dict[str, list[Variant]] = {}
    # safety_checker/model.onnx: diffusers' ONNX conversion script writes one (same inputs as sdlite's).
    for component in (*PARTS, TEXT_ENCODER_2, SAFETY_CHECKER):
        for fmt, graph in GRAPH_FILES.items():
            if (folder / component / graph).is_file():
                components.setdefault(component, []).append(
                    Variant(format=fmt, precision="fp32", attention="plain", files={f"{component}/{graph}": ""})
                )
    vae = _part_config(folder, "vae_decoder")
    unet = _part_config(folder, "unet")
    side = int(unet.get("sample_size", 64)) * vae_factor(vae.get("block_out_channels", [0] * 4))
    scheduler = _read_json(folder / SCHEDULER_CONFIG)
    return Manifest(
        family=family_of(unet, has_text_encoder="text_encoder" in components),
        name=folder.resolve().name,
        prediction_type=scheduler.get("prediction_type", "epsilon"),
        vae_scaling_factor=float(vae.get("scaling_factor", DEFAULT_VAE_SCALING)),
        default_size=(side, side),
        components=components,
    )


@dataclass
class ModelFolder:
    """A checked converted-model folder and the facts the pipeline needs from it."""

    path: Path
    manifest: Manifest
    scheduler_config: dict
    _configs: dict[str, dict] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def open(cls, path: str | Path) -> ModelFolder:
        """Check that ``path`` is a converted-model folder and read its manifest (or infer one)."""
        folder = Path(path)
        if not folder.is_dir():
            raise InputError(f"{folder}: model folder not found (convert a checkpoint with `sdlite convert`)")
        if not (folder / MODEL_INDEX).is_file():
            raise InputError(f"{folder}: not a converted model folder (no {MODEL_INDEX})")
        _read_json(folder / MODEL_INDEX)
        manifest_path = folder / MANIFEST_NAME
        if manifest_path.is_file():
            try:
                manifest = Manifest.from_json(_read_json(manifest_path))
            except ValueError as exc:
                raise InputError(f"{manifest_path}: malformed manifest: {exc}") from None
        else:
            manifest = _infer_manifest(folder)
        scheduler_config = _read_json(folder / SCHEDULER_CONFIG)
        tokenizers = [TOKENIZER_DIR] if manifest.family != "sdxl-refiner" else []
        tokenizers += [TOKENIZER_2_DIR] if manifest.family in SDXL_FAMILIES else []
        for name in tokenizers:
            if not (folder / name).is_dir():
                raise InputError(f"{folder / name}: missing (the model folder has no tokenizer)")
        return cls(folder, manifest, scheduler_config)

    def variants(self, component: str) -> list[Variant]:
        """Every variant of ``component`` the folder holds."""
        return self.manifest.components.get(component, [])

    def graph(self, component: str, formats: tuple[str, ...], precision: str | None = None) -> Path:
        """The graph file of ``component`` in the first of ``formats`` the folder holds (in ``precision``,
        else the first precision held), after checking that every file of that variant is there."""
        variant = self.variant(component, formats, precision)
        self.check_files(variant)
        return self.path / variant.main_file

    def check_files(self, variant: Variant, verify: bool = False) -> None:
        """Every file ``variant`` lists must exist; with ``verify``, also have the sha256 the manifest records
        (files of folders without a manifest have no recorded hash and are not compared)."""
        for name, digest in variant.files.items():
            file = self.path / name
            if not file.is_file():
                raise InputError(f"{file}: missing (the model folder is incomplete; convert again)")
            if verify and digest and sha256_file(file) != digest:
                raise InputError(
                    f"{file}: its sha256 is not the one {MANIFEST_NAME} records (the file was changed or damaged; "
                    "convert again)"
                )

    def verify(self) -> int:
        """Check every file of every variant against its recorded sha256; returns how many files were checked."""
        count = 0
        for variants in self.manifest.components.values():
            for variant in variants:
                self.check_files(variant, verify=True)
                count += len(variant.files)
        return count

    def variant(self, component: str, formats: tuple[str, ...], precision: str | None = None) -> Variant:
        """The variant ``graph`` picks."""
        held = self.variants(component)
        if not held:
            raise InputError(f"{self.path}: the model has no {component} (the folder is incomplete; convert again)")
        matching = [
            v for fmt in formats for v in held if v.format == fmt and (precision is None or v.precision == precision)
        ]
        if not matching:
            have = ", ".join(sorted({f"{v.format} {v.precision}" for v in held}))
            wanted = f"{' or '.join(formats)} {precision or ''}".strip()
            raise InputError(f"{self.path}: {component} has no {wanted} variant; it holds: {have}")
        return matching[0]

    def tiny_vae_precision(self, part: str, formats: tuple[str, ...], precision: str | None) -> str | None:
        """The precision of the tiny VAE's ``part`` that goes with the model's ``precision``: the same when held,
        else fp16 for any reduced precision (it is converted in fp32 and fp16 only), else the first held."""
        held = {v.precision for v in self.variants(part) if v.format in formats}
        if precision in held or precision is None:
            return precision
        return "fp16" if precision != "fp32" and "fp16" in held else None

    def part_config(self, part: str) -> dict:
        """The ``config.json`` of ``part`` ({} when the folder has none), read once."""
        if part not in self._configs:
            self._configs[part] = _part_config(self.path, part)
        return self._configs[part]

    @property
    def unet_in_channels(self) -> int:
        """Channels the U-Net takes: 4, or 9 for inpainting models (latents + mask + masked image)."""
        return int(self.part_config("unet").get("in_channels", LATENT_CHANNELS))

    @property
    def text_width(self) -> int | None:
        """The width of the text encoder's token vectors (768 for SD 1.x, 1024 for SD 2.x), from its config
        (or the U-Net's cross-attention width, which equals it); None when neither file says."""
        for part, key in (
            ("text_encoder", "hidden_size"),
            (TEXT_ENCODER_2, "hidden_size"),
            ("unet", "cross_attention_dim"),
        ):
            value = self.part_config(part).get(key)
            if isinstance(value, int):
                return value
        return None

    def tokenizer(self, text_encoder: str = "text_encoder") -> CLIPTokenizer:
        """The CLIP tokenizer of ``text_encoder`` (SDXL's second has its own); InputError naming the file when a
        tokenizer file is missing or broken."""
        folder = self.path / (TOKENIZER_2_DIR if text_encoder == TEXT_ENCODER_2 else TOKENIZER_DIR)
        try:
            return CLIPTokenizer.from_folder(folder)
        except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
            raise InputError(f"{folder}: unusable tokenizer ({exc})") from None

    @property
    def family(self) -> str:
        """The model family: sd15, sd2, sdxl or sdxl-refiner (``sdlite.layout.family_of``)."""
        return self.manifest.family

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        """Whether an empty negative prompt conditions with zeros (SDXL base's pipeline option)."""
        return bool(_read_json(self.path / MODEL_INDEX).get("force_zeros_for_empty_prompt", False))

    @property
    def latent_factor(self) -> int:
        """Pixels per latent cell along each side, from the VAE's config (8 when the folder does not say)."""
        return vae_factor(self.part_config("vae_decoder").get("block_out_channels", [0] * 4))

    @property
    def model_hash(self) -> str | None:
        """The source checkpoint's sha256, when the manifest knows it."""
        return self.manifest.source_sha256
