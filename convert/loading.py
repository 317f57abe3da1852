"""Load a Stable Diffusion checkpoint into diffusers: a diffusers folder, a hub id, or one file."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sdlite.convert.checkpoint_file import PICKLE_SUFFIXES, open_state_dict
from sdlite.errors import InputError, summarize
from sdlite.hashing import sha256_file

_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


@dataclass
class LoadedCheckpoint:
    """A diffusers pipeline with what the manifest records about where it came from, and the checkpoint's
    safety checker with its feature extractor when it has one (single files never do)."""

    pipe: object
    name: str
    sha256: str | None
    safety_checker: object | None = None
    feature_extractor: object | None = None


def _unet_weights(folder: Path) -> Path | None:
    for name in _WEIGHT_NAMES:
        if (folder / "unet" / name).is_file():
            return folder / "unet" / name
    return None


def _float32():
    import torch

    return torch.float32


def _load_folder(folder: Path):
    from diffusers import DiffusionPipeline

    if not (folder / "model_index.json").is_file():
        raise InputError(f"{folder}: not a diffusers folder (no model_index.json)")
    try:
        return DiffusionPipeline.from_pretrained(
            folder, torch_dtype=_float32(), safety_checker=None, requires_safety_checker=False
        )
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"{folder}: could not be loaded as a diffusers pipeline ({summarize(exc)})") from None


def _load_safety_checker(folder: Path) -> tuple[object | None, object | None]:
    """The folder's ``StableDiffusionSafetyChecker`` and ``CLIPImageProcessor`` when model_index.json lists a
    safety checker, else (None, None). The pipeline itself is loaded without them (so that nothing else in
    conversion runs the checker); they are exported as a part of their own."""
    index = json.loads((folder / "model_index.json").read_text())
    if not (index.get("safety_checker") or [None])[0]:
        return None, None
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    try:
        checker = StableDiffusionSafetyChecker.from_pretrained(folder / "safety_checker", torch_dtype=_float32())
        processor = CLIPImageProcessor.from_pretrained(folder / "feature_extractor")
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(
            f"{folder}: model_index.json lists a safety checker that could not be loaded ({summarize(exc)})"
        ) from None
    return checker.eval(), processor


def _load_single_file(path: Path, allow_pickle: bool, scratch: Path, quiet: bool):
    """A checkpoint in one file (A1111 / model-site layout), read safely and unpacked without the hub into the
    diffusers folder ``scratch``, which is then loaded like any other (memory-mapped)."""
    from sdlite.convert.checkpoint_file import read_safetensors_header
    from sdlite.convert.single_file import unpack_ldm

    state = open_state_dict(path, allow_pickle=allow_pickle)
    metadata = read_safetensors_header(path).get("__metadata__") if path.suffix.lower() == ".safetensors" else None
    unpack_ldm(state, str(path), scratch, metadata, quiet)
    del state
    return _load_folder(scratch)


def _check_supported(pipe, source: str) -> None:
    """A Stable Diffusion pipeline: SD 1.x/2.x (one text encoder), SDXL base (two) or the SDXL refiner (only the
    second); one line naming what is missing otherwise."""
    missing = [name for name in ("unet", "vae", "scheduler") if getattr(pipe, name, None) is None]
    encoders = [
        (encoder, tokenizer)
        for encoder, tokenizer in (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"))
        if getattr(pipe, encoder, None) is not None
    ]
    if not encoders:
        missing.append("text_encoder")
    missing += [tokenizer for _, tokenizer in encoders if getattr(pipe, tokenizer, None) is None]
    if missing:
        raise InputError(f"{source}: not a Stable Diffusion pipeline (missing {', '.join(missing)})")


def quiet_diffusers() -> None:
    """Silence diffusers' and transformers' loading bars and advice (for --quiet)."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def load_checkpoint(
    source: str, allow_pickle: bool = False, scratch_parent: Path | None = None, quiet: bool = False
) -> LoadedCheckpoint:
    """Load ``source`` as a float32 diffusers pipeline.

    ``source`` is a diffusers folder, a single ``.safetensors`` file in the original SD layout (unpacked
    offline into a diffusers folder under ``scratch_parent``, the system's temporary folder by default, see
    ``sdlite.convert.single_file``), or a hub id (``owner/name``, fetched through diffusers' own downloader on
    machines that can reach the hub). Pickled checkpoints are refused unless ``allow_pickle``, and even then
    only their tensors are read. ``quiet``: no progress bar while a file is unpacked.
    """
    path = Path(source)
    checker = processor = None
    if path.is_dir():
        pipe = _load_folder(path)
        checker, processor = _load_safety_checker(path)
        weights = _unet_weights(path)
        sha = sha256_file(weights) if weights else None
        name = path.resolve().name
    elif path.is_file():
        if path.suffix.lower() not in PICKLE_SUFFIXES | {".safetensors"}:
            raise InputError(f"{path}: expected a diffusers folder, a .safetensors file or a hub id")
        scratch = Path(tempfile.mkdtemp(prefix=".sdlite-unpack-", dir=scratch_parent))
        try:
            pipe = _load_single_file(path, allow_pickle, scratch, quiet)
        finally:
            # The loaded weights are memory-mapped: POSIX keeps the files readable until they are unmapped,
            # and the disk space returns with the pipeline.
            shutil.rmtree(scratch, ignore_errors=True)
        sha = sha256_file(path)
        name = path.stem
    elif source.count("/") == 1 and not source.startswith((".", "/")):
        from diffusers import DiffusionPipeline

        try:
            folder = Path(DiffusionPipeline.download(source))
        except Exception as exc:  # the hub client raises many types; the user needs one line
            raise InputError(
                f"{source}: not a local path, and the hub id could not be fetched ({type(exc).__name__})"
            ) from exc
        pipe = _load_folder(folder)
        checker, processor = _load_safety_checker(folder)
        weights = _unet_weights(folder)
        sha = sha256_file(weights) if weights else None
        name = source.split("/")[-1]
    else:
        raise InputError(
            f"{source}: no such file or folder (expected a diffusers folder, a .safetensors file or a hub id)"
        )
    _check_supported(pipe, source)
    return LoadedCheckpoint(pipe=pipe, name=name, sha256=sha, safety_checker=checker, feature_extractor=processor)


@dataclass
class TinyVae:
    """A tiny autoencoder (diffusers' ``AutoencoderTiny``: TAESD, TAESDXL) and its name for the infotext."""

    vae: object
    name: str
    # The latent side its decoder's W8A8 variant is calibrated at: the model's own, as its U-Net is.
    calibration_cells: int


def load_tiny_vae(source: str, latent_channels: int, calibration_cells: int) -> TinyVae:
    """Load ``source`` (a diffusers ``AutoencoderTiny`` folder, such as madebyollin/taesd's, or its hub id) as
    float32 for a model whose latents have ``latent_channels`` (InputError when they differ or it is not one) and
    whose U-Net is calibrated at ``calibration_cells``."""
    from diffusers import AutoencoderTiny

    path = Path(source)
    is_hub_id = not path.exists() and source.count("/") == 1 and not source.startswith((".", "/"))
    if not path.is_dir() and not is_hub_id:
        raise InputError(f"--tiny-vae {source}: no such folder (expected an AutoencoderTiny folder or hub id)")
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise InputError(f"--tiny-vae {source}: no config.json (expected an AutoencoderTiny folder)")
        try:
            kind = json.loads(config.read_text()).get("_class_name")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise InputError(f"--tiny-vae {config}: not a valid JSON object") from None
        if kind != "AutoencoderTiny":
            raise InputError(f"--tiny-vae {source}: {kind or 'an unknown model'}, expected an AutoencoderTiny (TAESD)")
    try:
        vae = AutoencoderTiny.from_pretrained(source, torch_dtype=_float32())
    except Exception as exc:  # missing weights, a hub id that cannot be fetched: one line either way
        raise InputError(f"--tiny-vae {source}: could not be loaded as an AutoencoderTiny ({summarize(exc)})") from None
    if vae.config.latent_channels != latent_channels:
        raise InputError(
            f"--tiny-vae {source}: makes {vae.config.latent_channels}-channel latents; this model's have "
            f"{latent_channels} (a tiny VAE of another family?)"
        )
    name = path.resolve().name if path.is_dir() else source.split("/")[-1]
    return TinyVae(vae.eval(), name, calibration_cells)
