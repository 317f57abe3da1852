"""Fuse LoRA files into the U-Net and text encoder before export (``sdlite convert --lora FILE:WEIGHT``).

Each layer's update, ``weight * alpha / rank * up @ down`` (``sdlite.lora_files``), is added into the weight it
targets, so the exported graph carries it at no run-time cost; ``sdlite generate --lora-dir`` applies LoRAs at run
time instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sdlite.convert.checkpoint_file import read_safetensors_header, read_state_dict
from sdlite.errors import InputError
from sdlite.hashing import sha256_file, tensor_data_sha256
from sdlite.lora_files import LoraLayer, group_layers, metadata_alphas
from sdlite.lora_graph import kohya_names


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


def _metadata_alphas(path: Path) -> dict[str, float]:
    if path.suffix.lower() != ".safetensors":
        return {}
    return metadata_alphas(read_safetensors_header(path).get("__metadata__") or {}, path)


def _kohya_index(component: str, module) -> dict[str, object]:
    """Map kohya's names (the module path with ``_`` for ``.``, diffusers' or the original SD one) to modules
    holding a weight."""
    modules = {name: sub for name, sub in module.named_modules() if getattr(sub, "weight", None) is not None}
    return {kohya: modules[path] for kohya, path in kohya_names(modules, component).items()}


def _target(pipe, layer: LoraLayer, indexes: dict, path: Path):
    component = getattr(pipe, layer.component, None)
    if component is None:
        raise InputError(f"{path}: targets {layer.component}, which this checkpoint lacks")
    if layer.kohya:
        if layer.component not in indexes:
            indexes[layer.component] = _kohya_index(layer.component, component)
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


def _delta(layer: LoraLayer, weight_shape, scale: float, path: Path):
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
    layers = group_layers(state, path)
    alphas = _metadata_alphas(path)
    indexes: dict = {}
    updates = []
    for layer in layers:
        module = _target(pipe, layer, indexes, path)
        scale = spec.weight * layer.scale(alphas.get(layer.component))
        updates.append((module, _delta(layer, module.weight.shape, scale, path)))
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
