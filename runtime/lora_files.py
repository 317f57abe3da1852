"""LoRA files: which layers a file changes, with their down and up matrices and alpha, read without torch.

A LoRA layer adds a low-rank update to one weight: ``W + m * alpha / rank * up @ down`` (Hu et al. 2021,
"LoRA", eq. 3, with kohya's alpha scaling; ``m`` is the multiplier the user gives). Convolutions take the same
update with ``down`` as a k x k convolution into ``rank`` channels and ``up`` as a 1 x 1 convolution out of
them (LyCORIS' LoCon). Both fusion at conversion (``sdlite.convert.lora``) and the run-time branches
(``sdlite.lora_graph``) read layers through :func:`group_layers`.

Key layouts read, the ones users download:

* kohya / AUTOMATIC1111: ``lora_unet_<module path with _>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``;
  ``lora_te_...`` (``lora_te1_``, ``lora_te2_`` in SDXL files) for the text encoders. The module path is
  diffusers' or the original Stable Diffusion (LDM) one (``input_blocks_1_1_...``); the graph side resolves it;
* diffusers / PEFT: ``unet.<module path>.lora_A.weight`` / ``.lora_B.weight`` (optionally ``.alpha``, or
  ``lora_alpha`` in the file's ``lora_adapter_metadata``), and diffusers' older ``.lora.down.weight`` /
  ``.lora.up.weight``, ``.processor.to_q_lora.down.weight`` and ``....lora_linear_layer.down.weight`` forms.

Other adapter types (LoHa, LoKr, DoRA, OFT, full-weight diffs, LoCon's CP decomposition) are refused by name.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sdlite.errors import InputError

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
_KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te_": "text_encoder",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
}
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
# Key fragments of the adapter types that are not a plain low-rank product, and their names.
_FOREIGN = {
    "hada_": "LoHa",
    "lokr_": "LoKr",
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
    "oft_": "OFT",
    ".diff": "full-weight difference",
    "lora_mid": "LoCon with CP decomposition (lora_mid)",
}


@dataclass
class LoraLayer:
    """The LoRA matrices for one target weight (numpy arrays or torch tensors, as the reader gave them)."""

    component: str
    module: str  # diffusers module path inside the component, or a kohya underscore name
    kohya: bool
    down: object = None
    up: object = None
    alpha: float | None = None

    @property
    def rank(self) -> int:
        """The rank: rows of ``down``."""
        return int(self.down.shape[0])

    def scale(self, default_alpha: float | None = None) -> float:
        """``alpha / rank``; without an alpha, ``default_alpha`` (the file's metadata) or the rank (scale 1, PEFT's
        and diffusers' default)."""
        alpha = self.alpha if self.alpha is not None else default_alpha
        return 1.0 if alpha is None else float(alpha) / self.rank


def split_key(key: str) -> tuple[str, str, bool, str] | None:
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


def group_layers(state: Mapping[str, object], path: Path) -> list[LoraLayer]:
    """Pair each layer's down, up and alpha tensors; refuse keys that are not plain LoRA layers."""
    for key in state:
        for mark, kind in _FOREIGN.items():
            if mark in key:
                raise InputError(f"{path}: a {kind} file ({key!r}); sdlite applies plain LoRA and LoCon layers only")
    layers: dict[tuple[str, str], LoraLayer] = {}
    unknown = []
    for key, tensor in state.items():
        parts = split_key(key)
        if parts is None:
            unknown.append(key)
            continue
        component, module, kohya, role = parts
        layer = layers.setdefault((component, module), LoraLayer(component, module, kohya))
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
    for layer in layers.values():
        down, up = layer.down.shape, layer.up.shape
        if len(down) not in (2, 4) or len(up) not in (2, 4) or up[1] != down[0] or any(d != 1 for d in up[2:]):
            raise InputError(f"{path}: layer {layer.module!r}: up {tuple(up)} and down {tuple(down)} do not pair")
    return list(layers.values())


def metadata_alphas(metadata: Mapping[str, str], path: Path) -> dict[str, float]:
    """``lora_alpha`` per component from diffusers' ``lora_adapter_metadata`` (PEFT files without alpha keys)."""
    try:
        adapters = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError:
        return {}
    alphas = {}
    for component in COMPONENTS:
        config = adapters.get(component) if isinstance(adapters, dict) else None
        if isinstance(config, dict) and isinstance(config.get("lora_alpha"), int | float):
            if config.get("alpha_pattern") or config.get("rank_pattern"):
                raise InputError(f"{path}: per-layer alpha/rank patterns in its metadata are not supported")
            alphas[component] = float(config["lora_alpha"])
    return alphas
