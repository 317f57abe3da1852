"""Open a converted-model folder: sdlite's own (with ``sdlite.json``) or one written by optimum-cli."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sdlite.errors import InputError
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
    TOKENIZER_DIR,
    family_of,
    vae_factor,
)
from sdlite.manifest import Manifest, Variant


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None


def _part_config(folder: Path, part: str) -> dict:
    """A part's ``config.json`` ({} when the folder has none)."""
    path = folder / part / CONFIG_NAME
    return _read_json(path) if path.is_file() else {}


def _infer_manifest(folder: Path) -> Manifest:
    """Describe a folder without ``sdlite.json`` (e.g. from ``optimum-cli export``) from its files."""
    components: dict[str, list[Variant]] = {}
    # safety_checker/model.onnx: diffusers' ONNX conversion script writes one (same inputs as sdlite's).
    for component in (*PARTS, SAFETY_CHECKER):
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
        family=family_of(unet.get("cross_attention_dim")),
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

    @classmethod
    def open(cls, path: str | Path) -> ModelFolder:
        """Check that ``path`` is a converted-model folder and read its manifest (or infer one)."""
        folder = Path(path)
        if not folder.is_dir():
            raise InputError(f"{folder}: model folder not found (convert a checkpoint with `sdlite convert`)")
        if not (folder / MODEL_INDEX).is_file():
            raise InputError(f"{folder}: not a converted model folder (no {MODEL_INDEX})")
        manifest_path = folder / MANIFEST_NAME
        if manifest_path.is_file():
            try:
                manifest = Manifest.from_json(_read_json(manifest_path))
            except (KeyError, TypeError, ValueError) as exc:
                raise InputError(f"{manifest_path}: malformed manifest ({exc})") from None
        else:
            manifest = _infer_manifest(folder)
        scheduler_config = _read_json(folder / SCHEDULER_CONFIG)
        if not (folder / TOKENIZER_DIR).is_dir():
            raise InputError(f"{folder / TOKENIZER_DIR}: missing (the model folder has no tokenizer)")
        return cls(folder, manifest, scheduler_config)

    def variants(self, component: str) -> list[Variant]:
        """Every variant of ``component`` the folder holds."""
        return self.manifest.components.get(component, [])

    def graph(self, component: str, formats: tuple[str, ...], precision: str | None = None) -> Path:
        """The graph file of ``component`` in the first of ``formats`` the folder holds (in ``precision``,
        else the first precision held)."""
        file = self.path / self.variant(component, formats, precision).main_file
        if not file.is_file():
            raise InputError(f"{file}: missing (the model folder is incomplete; convert again)")
        return file

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

    @property
    def unet_in_channels(self) -> int:
        """Channels the U-Net takes: 4, or 9 for inpainting models (latents + mask + masked image)."""
        return int(_part_config(self.path, "unet").get("in_channels", LATENT_CHANNELS))

    @property
    def text_width(self) -> int | None:
        """The width of the text encoder's token vectors (768 for SD 1.x, 1024 for SD 2.x), from its config
        (or the U-Net's cross-attention width, which equals it); None when neither file says."""
        for part, key in (("text_encoder", "hidden_size"), ("unet", "cross_attention_dim")):
            value = _part_config(self.path, part).get(key)
            if isinstance(value, int):
                return value
        return None

    @property
    def tokenizer_dir(self) -> Path:
        """The tokenizer folder (vocab.json, merges.txt, ...)."""
        return self.path / TOKENIZER_DIR

    @property
    def latent_factor(self) -> int:
        """Pixels per latent cell along each side, from the VAE's config (8 when the folder does not say)."""
        return vae_factor(_part_config(self.path, "vae_decoder").get("block_out_channels", [0] * 4))

    @property
    def model_hash(self) -> str | None:
        """The source checkpoint's sha256, when the manifest knows it."""
        return self.manifest.source_sha256
