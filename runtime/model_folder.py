"""Open a converted-model folder: sdlite's own (with ``sdlite.json``) or one written by optimum-cli."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sdlite.errors import InputError
from sdlite.manifest import MANIFEST_NAME, Manifest, Variant

REQUIRED = ("text_encoder", "unet", "vae_decoder")
GRAPH_FILES = {"onnx": "model.onnx", "openvino": "openvino_model.xml"}
# SD's VAE latents are scaled to unit variance by this factor (Rombach et al. 2022, sec. 4.3.2).
DEFAULT_VAE_SCALING = 0.18215


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from None


def _infer_manifest(folder: Path) -> Manifest:
    """Describe a folder without ``sdlite.json`` (e.g. from ``optimum-cli export``) from its files."""
    components: dict[str, list[Variant]] = {}
    # safety_checker/model.onnx: diffusers' ONNX conversion script writes one (same inputs as sdlite's).
    for component in ("text_encoder", "unet", "vae_encoder", "vae_decoder", "safety_checker"):
        for fmt, graph in GRAPH_FILES.items():
            if (folder / component / graph).is_file():
                components.setdefault(component, []).append(
                    Variant(format=fmt, precision="fp32", attention="plain", files={f"{component}/{graph}": ""})
                )
    vae_config = folder / "vae_decoder" / "config.json"
    vae = _read_json(vae_config) if vae_config.is_file() else {}
    unet_config = folder / "unet" / "config.json"
    unet = _read_json(unet_config) if unet_config.is_file() else {}
    scale = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    side = int(unet.get("sample_size", 64)) * scale
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
    return Manifest(
        family="sd2" if unet.get("cross_attention_dim") == 1024 else "sd15",
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
        if not (folder / "model_index.json").is_file():
            raise InputError(f"{folder}: not a converted model folder (no model_index.json)")
        manifest_path = folder / MANIFEST_NAME
        if manifest_path.is_file():
            try:
                manifest = Manifest.from_json(_read_json(manifest_path))
            except (KeyError, TypeError, ValueError) as exc:
                raise InputError(f"{manifest_path}: malformed manifest ({exc})") from None
        else:
            manifest = _infer_manifest(folder)
        scheduler_config = _read_json(folder / "scheduler" / "scheduler_config.json")
        if not (folder / "tokenizer").is_dir():
            raise InputError(f"{folder / 'tokenizer'}: missing (the model folder has no tokenizer)")
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
        config = self.path / "unet" / "config.json"
        return int(_read_json(config).get("in_channels", 4)) if config.is_file() else 4

    @property
    def text_width(self) -> int | None:
        """The width of the text encoder's token vectors (768 for SD 1.x, 1024 for SD 2.x), from its config
        (or the U-Net's cross-attention width, which equals it); None when neither file says."""
        for config, key in (("text_encoder", "hidden_size"), ("unet", "cross_attention_dim")):
            path = self.path / config / "config.json"
            value = _read_json(path).get(key) if path.is_file() else None
            if isinstance(value, int):
                return value
        return None

    @property
    def tokenizer_dir(self) -> Path:
        """The tokenizer folder (vocab.json, merges.txt, ...)."""
        return self.path / "tokenizer"

    @property
    def model_hash(self) -> str | None:
        """The source checkpoint's sha256, when the manifest knows it."""
        return self.manifest.source_sha256
