"""``sdlite.json``: what a converted-model folder holds, written by convert and read by the runtime.

Foreign folders (written by ``optimum-cli export onnx|openvino``) have no manifest; the runtime infers
the same facts from their files (see ``sdlite.model_folder``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from sdlite.layout import MANIFEST_NAME

FORMAT_VERSION = 1


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

    @property
    def main_file(self) -> str:
        """The graph file (``model.onnx`` or ``openvino_model.xml``)."""
        return next(iter(self.files))


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
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        """A JSON-ready dict."""
        data = asdict(self)
        data["default_size"] = list(self.default_size)
        return data

    @classmethod
    def from_json(cls, data: dict) -> Manifest:
        """Parse the dict ``to_json`` wrote; raises KeyError/TypeError on a malformed manifest."""
        components = {name: [Variant(**v) for v in variants] for name, variants in data["components"].items()}
        return cls(
            family=data["family"],
            name=data["name"],
            prediction_type=data["prediction_type"],
            vae_scaling_factor=float(data["vae_scaling_factor"]),
            default_size=tuple(data["default_size"]),
            source_sha256=data.get("source_sha256"),
            components=components,
            loras=list(data.get("loras", [])),
            format_version=int(data.get("format_version", FORMAT_VERSION)),
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
