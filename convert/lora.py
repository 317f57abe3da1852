"""Fuse LoRA files into the U-Net and text encoder before export (``sdlite convert --lora FILE:WEIGHT``).

Each LoRA layer adds a low-rank update to one weight: ``W += weight * alpha / rank * up @ down`` (Hu et al.
2021, "LoRA", eq. 3, with kohya's alpha scaling). Convolutions take the same update with ``down`` as a
k x k convolution into ``rank`` channels and ``up`` as a 1 x 1 convolution out of them, so the product of
the two flattened matrices is again a k x k kernel.

Two file layouts are read, the ones users download:

* kohya / AUTOMATIC1111: ``lora_unet_<module path with _>.lora_down.weight``, ``.lora_up.weight``,
  ``.alpha``; ``lora_te_...`` for the text encoder;
* diffusers / PEFT: ``unet.<module path>.lora_A.weight`` / ``.lora_B.weight`` (optionally ``.alpha``), and
  diffusers' older ``.lora.down.weight`` / ``.lora.up.weight``, ``.processor.to_q_lora.down.weight`` and
  ``text_encoder....lora_linear_layer.down.weight`` forms.

Layers of other adapter types (LoHa, LoKr, DoRA) are refused by name rather than silently skipped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from sdlite.convert.checkpoint_file import read_safetensors_header, read_state_dict, tensor_data_sha256
from sdlite.errors import InputError
from sdlite.hashing import sha256_file

COMPONENTS = ("unet", "text_encoder")
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}
# Suffixes naming the down/up matrices in each layout, longest first so that ".lora.down.weight" is not
# taken for something shorter.
_DOWN_UP = (
    (".lora_down.weight", ".lora_up.weight"),
    (".lora_A.default.weight", ".lora_B.default.weight"),
    (".lora_A.weight", ".lora_B.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    ("_lora.down.weight", "_lora.up.weight"),
)
_FOREIGN = ("hada_", "lokr_", "dora_scale", "lora_magnitude_vector", ".diff", "oft_")


@dataclass(frozen=True)
class LoraSpec:
    """One ``--lora FILE[:WEIGHT]`` argument."""

    path: Path
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """``style.safetensors:0.8`` -> (path, 0.8); the weight is optional (1.0)."""
        head, sep, tail = text.rpartition(":")
        # Only a trailing number is a weight, so paths holding ":" (C:\\..., odd names) still work.
        if sep and head and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", tail):
            return cls(Path(head), float(tail))
        return cls(Path(text), 1.0)


@dataclass
class _Layer:
    """The LoRA matrices for one target weight."""

    component: str
    module: str  # diffusers module path inside the component, or a kohya underscore name
    kohya: bool
    down: object = None
    up: object = None
    alpha: float | None = None


def _split_key(key: str) -> tuple[str, str, bool, str] | None:
    """``key`` -> (component, module name, is_kohya, role) with role in down/up/alpha; None if unknown."""
    for prefix, component in _KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            name, _, rest = key.partition(".")
            role = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(rest)
            return (component, name[len(prefix) :], True, role) if role else None
    key = key.removeprefix("base_model.model.")
    component, _, path = key.partition(".")
    if component not in COMPONENTS:
        # diffusers' oldest attention-processor files hold U-Net keys without a prefix.
        component, path = "unet", key
    if path.endswith(".alpha"):
        return component, path[: -len(".alpha")], False, "alpha"
    for down, up in _DOWN_UP:
        for role, suffix in (("down", down), ("up", up)):
            if path.endswith(suffix):
                module = path[: -len(suffix)]
                # ".processor.to_q_lora" (attention processors) targets the attention's to_q layer.
                module = re.sub(r"\.processor\.(to_[qkv]|to_out)$", lambda m: "." + m.group(1), module)
                module = re.sub(r"\.to_out$", ".to_out.0", module)
                return component, module, False, role
    return None


def _group(state: dict, path: Path) -> list[_Layer]:
    """Pair each layer's down, up and alpha tensors; refuse keys that are not LoRA layers."""
    foreign = [key for key in state if any(mark in key for mark in _FOREIGN)]
    if foreign:
        raise InputError(
            f"{path}: holds {foreign[0]!r}, a LyCORIS/DoRA layer type sdlite cannot fuse; only plain LoRA is supported"
        )
    layers: dict[tuple[str, str], _Layer] = {}
    unknown = []
    for key, tensor in state.items():
        parts = _split_key(key)
        if parts is None:
            unknown.append(key)
            continue
        component, module, kohya, role = parts
        layer = layers.setdefault((component, module), _Layer(component, module, kohya))
        if role == "alpha":
            layer.alpha = float(tensor.item())
        else:
            setattr(layer, role, tensor)
    if unknown:
        raise InputError(
            f"{path}: {len(unknown)} key(s) are not LoRA layers, e.g. {unknown[0]!r} "
            "(expected kohya lora_unet_/lora_te_ or diffusers unet./text_encoder. keys)"
        )
    incomplete = [layer for layer in layers.values() if layer.down is None or layer.up is None]
    if incomplete:
        raise InputError(f"{path}: layer {incomplete[0].module!r} lacks its down or up matrix")
    if not layers:
        raise InputError(f"{path}: holds no LoRA layers")
    return list(layers.values())


def _metadata_alphas(path: Path) -> dict[str, float]:
    """``lora_alpha`` per component from diffusers' ``lora_adapter_metadata`` (PEFT files without alpha keys)."""
    if path.suffix.lower() != ".safetensors":
        return {}
    meta = read_safetensors_header(path).get("__metadata__") or {}
    try:
        adapters = json.loads(meta.get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError:
        return {}
    alphas = {}
    for component in COMPONENTS:
        config = adapters.get(component)
        if isinstance(config, dict) and isinstance(config.get("lora_alpha"), int | float):
            if config.get("alpha_pattern") or config.get("rank_pattern"):
                raise InputError(f"{path}: per-layer alpha/rank patterns in its metadata are not supported")
            alphas[component] = float(config["lora_alpha"])
    return alphas


def _kohya_index(module) -> dict[str, object]:
    """Map kohya's names (the module path with ``_`` for ``.``) to modules holding a weight."""
    return {
        name.replace(".", "_"): sub for name, sub in module.named_modules() if getattr(sub, "weight", None) is not None
    }


def _target(pipe, layer: _Layer, indexes: dict, path: Path):
    component = getattr(pipe, layer.component, None)
    if component is None:
        raise InputError(f"{path}: targets {layer.component}, which this checkpoint lacks")
    if layer.kohya:
        if layer.component not in indexes:
            indexes[layer.component] = _kohya_index(component)
        module = indexes[layer.component].get(layer.module)
    else:
        try:
            module = component.get_submodule(layer.module)
        except AttributeError:
            module = None
    if module is None or getattr(module, "weight", None) is None:
        raise InputError(
            f"{path}: layer {layer.module!r} matches no {layer.component} layer of this checkpoint "
            "(a LoRA for another model family?)"
        )
    return module


def _delta(layer: _Layer, weight_shape, scale: float, path: Path):
    """``scale * up @ down`` shaped like the target weight (linear, 1x1 or kxk convolution)."""
    down, up = layer.down.float(), layer.up.float()
    rank = down.shape[0]
    if up.shape[1] != rank or up.shape[0] != weight_shape[0] or up[0].numel() != rank:
        raise InputError(f"{path}: layer {layer.module!r}: up {tuple(up.shape)} and down {tuple(down.shape)} differ")
    product = up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)  # out, in*k*k
    if product.numel() != weight_shape.numel():
        raise InputError(
            f"{path}: layer {layer.module!r} makes a {tuple(product.shape)} update for a {tuple(weight_shape)} "
            "weight (a LoRA for another model size?)"
        )
    return product.reshape(weight_shape) * scale


def fuse_lora(pipe, spec: LoraSpec, allow_pickle: bool = False) -> dict:
    """Add one LoRA file into ``pipe``'s U-Net and text encoder weights in place.

    Returns what the manifest records: the name (file stem), the file's sha256, A1111's LoRA hash (sha256
    of the tensor bytes), the weight and the number of layers changed. Every layer is checked before any
    weight changes, so a bad file leaves the pipeline as it was.
    """
    import torch

    path = spec.path
    if not path.is_file():
        raise InputError(f"--lora {path}: file not found")
    state = read_state_dict(path, allow_pickle=allow_pickle)
    layers = _group(state, path)
    alphas = _metadata_alphas(path)
    indexes: dict = {}
    updates = []
    for layer in layers:
        module = _target(pipe, layer, indexes, path)
        rank = layer.down.shape[0]
        # No alpha anywhere means alpha = rank (PEFT's and diffusers' default): scale 1.
        alpha = layer.alpha if layer.alpha is not None else alphas.get(layer.component, float(rank))
        updates.append((module, _delta(layer, module.weight.shape, spec.weight * alpha / rank, path)))
    with torch.no_grad():
        for module, delta in updates:
            module.weight += delta.to(module.weight.dtype)
    return {
        "name": path.stem,
        "sha256": sha256_file(path),
        "a1111_hash": tensor_data_sha256(path),
        "weight": spec.weight,
        "layers": len(updates),
    }


def fuse_loras(pipe, specs: list[LoraSpec], allow_pickle: bool = False) -> list[dict]:
    """Fuse each LoRA in order (their updates add up); returns the manifest records."""
    return [fuse_lora(pipe, spec, allow_pickle) for spec in specs]
