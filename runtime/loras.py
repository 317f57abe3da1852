"""LoRAs named in the prompt, as AUTOMATIC1111 users write them: ``<lora:name:0.8>``, used at run time.

``--lora-dir DIR`` (``Pipeline.load(lora_dir=)``) makes every ``.safetensors`` LoRA under DIR usable by its file
name. A tag's arguments follow A1111: ``<lora:name>`` (multiplier 1), ``<lora:name:TE>``, ``<lora:name:TE:UNET>``,
``<lora:name:TE:UNET:DYN>`` or named ``te=``, ``unet=``, ``dyn=``: the text-encoder multiplier, the U-Net one
(default: the text encoder's) and a rank cap for LoRAs trained with dynamic rank. Tags are removed from the text
that is encoded (any ``<type:...>`` tag, as A1111 removes them), while the infotext keeps the prompt as written
and adds ``Lora hashes``.

Nothing is converted: each LoRA's layers become low-rank branches in the loaded text encoder and U-Net graphs
(``sdlite.lora_graph``), with the multipliers as an input. Changing only multipliers recompiles nothing; changing
which LoRAs are used reloads those two graphs once (:attr:`LoraSet.updates` has the time, with the first run).

Files that cannot serve the model (a pickle, a name two files share, another family's layers) fail with one clear
error when a prompt uses them, so one folder can hold LoRAs for several families.
"""

from __future__ import annotations

import difflib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from sdlite.errors import InputError, SdliteWarning
from sdlite.hashing import tensor_data_sha256
from sdlite.lora_files import COMPONENTS, LoraLayer, group_layers, metadata_alphas
from sdlite.lora_graph import LoraEdit, SlotLayers
from sdlite.safetensors_file import PICKLE_SUFFIXES, read_safetensors

__all__ = ["LoraLibrary", "LoraSet", "LoraUse", "parse_lora_tags", "strip_extra_networks"]

# A1111's extra-network tag: <type:arguments>.
_TAG = re.compile(r"<(\w+):([^>]+)>")
# The tag types that name a LoRA (LyCORIS files were once used through their own extension's "lyco").
_LORA_TYPES = ("lora", "lyco")
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


@dataclass(frozen=True)
class LoraUse:
    """One ``<lora:...>`` tag: the LoRA's name and its multipliers."""

    name: str
    te: float = 1.0
    unet: float = 1.0
    dyn: int | None = None


def _number(text: str, tag: str) -> float:
    if not _NUMBER.fullmatch(text.strip()):
        raise InputError(f"LoRA tag {tag}: {text!r} is not a number (expected <lora:name:multiplier>)")
    return float(text)


def _parse_tag(arguments: str, tag: str) -> LoraUse:
    items = [item.strip() for item in arguments.split(":")]
    name, positional, named = items[0], [], {}
    if not name:
        raise InputError(f"LoRA tag {tag}: no name (expected <lora:name:multiplier>)")
    for item in items[1:]:
        key, sep, value = item.partition("=")
        if sep:
            if key not in ("te", "unet", "dyn"):
                raise InputError(f"LoRA tag {tag}: unknown argument {key!r} (known: te, unet, dyn)")
            named[key] = value
        else:
            positional.append(item)
    if len(positional) > 3:
        raise InputError(f"LoRA tag {tag}: too many arguments (at most te, unet and dyn)")
    values = dict(zip(("te", "unet", "dyn"), positional, strict=False)) | named
    te = _number(values["te"], tag) if "te" in values else 1.0
    unet = _number(values["unet"], tag) if "unet" in values else te
    dyn = None
    if "dyn" in values:
        if not values["dyn"].isdigit() or int(values["dyn"]) < 1:
            raise InputError(f"LoRA tag {tag}: dyn {values['dyn']!r} must be a whole number of at least 1")
        dyn = int(values["dyn"])
    return LoraUse(name, te, unet, dyn)


def parse_lora_tags(prompt: str) -> list[LoraUse]:
    """The LoRAs ``prompt``'s tags name, in order; of two tags naming one LoRA, the last counts."""
    uses: dict[str, LoraUse] = {}
    for match in _TAG.finditer(prompt):
        if match[1].lower() in _LORA_TYPES:
            use = _parse_tag(match[2], match[0])
            uses.pop(use.name, None)
            uses[use.name] = use
    return list(uses.values())


def strip_extra_networks(prompt: str) -> str:
    """``prompt`` without its ``<type:...>`` tags (the text the text encoder sees). A tag of a type sdlite does not
    apply (a hypernetwork) gives a warning."""
    for match in _TAG.finditer(prompt):
        if match[1].lower() not in _LORA_TYPES:
            warnings.warn(f"{match[0]}: {match[1]} networks are not supported; the tag is ignored", SdliteWarning, 2)
    return _TAG.sub("", prompt)


@dataclass(eq=False)
class LoraFile:
    """One LoRA file's layers by component, read on first use."""

    name: str
    path: Path
    layers: dict[str, list[LoraLayer]]
    alphas: dict[str, float]
    _hash: str | None = None

    @classmethod
    def read(cls, name: str, path: Path) -> LoraFile:
        """Read and check ``path`` (a ``.safetensors`` LoRA)."""
        tensors, metadata = read_safetensors(path)
        layers: dict[str, list[LoraLayer]] = {}
        for layer in group_layers(tensors, path):
            layers.setdefault(layer.component, []).append(layer)
        return cls(name, path, layers, metadata_alphas(metadata, path))

    @property
    def a1111_hash(self) -> str:
        """The first 12 hex digits of the sha256 of the file's tensor bytes, as A1111's "Lora hashes" write it."""
        if self._hash is None:
            self._hash = tensor_data_sha256(self.path)[:12]
        return self._hash


class LoraLibrary:
    """The LoRA files under one folder (subfolders too), by name (the file name without ``.safetensors``). A name
    not found makes the folder be read again, so files added while a server runs are found."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise InputError(f"--lora-dir {self.folder}: folder not found")
        self._paths = self._scan()
        self._files: dict[Path, LoraFile] = {}

    def _scan(self) -> dict[str, list[Path]]:
        paths: dict[str, list[Path]] = {}
        for path in sorted(p for p in self.folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
            if path.suffix.lower() in PICKLE_SUFFIXES or path.suffix.lower() == ".safetensors":
                paths.setdefault(path.stem, []).append(path)
        return paths

    @property
    def names(self) -> list[str]:
        """Every name a prompt can use."""
        return sorted(self._paths)

    def paths(self, name: str) -> list[Path]:
        """The files named ``name`` (more than one is an error when a prompt uses the name)."""
        return list(self._paths.get(name, []))

    def get(self, name: str) -> LoraFile:
        """The LoRA ``name``; a one-line error for a missing name, a name two files share, or a pickle."""
        if name not in self._paths:
            self._paths = self._scan()
        paths = self._paths.get(name)
        if not paths:
            close = difflib.get_close_matches(name, self.names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f" ({len(self._paths)} LoRAs there)"
            raise InputError(f"LoRA {name!r}: no {name}.safetensors under {self.folder}{hint}")
        if len(paths) > 1:
            raise InputError(f"LoRA {name!r}: the name is used by {' and '.join(map(str, paths))}; rename one")
        path = paths[0]
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise InputError(
                f"LoRA {name!r} ({path}) is a pickle, which can run code when loaded; sdlite reads .safetensors LoRAs "
                "only (re-save it as .safetensors in a trusted environment)"
            )
        if path not in self._files:
            self._files[path] = LoraFile.read(name, path)
        return self._files[path]


# The multiplier each component takes from a tag.
_COMPONENT_MULTIPLIER = {"unet": "unet", "text_encoder": "te", "text_encoder_2": "te"}


class LoraSet:
    """Keeps the loaded graphs' LoRA branches in line with what each prompt asks for.

    ``set_edit(part, edit)`` installs (or, with None, removes) a part's LoRA edit; the part pool reloads the part
    when its edit changes. ``components`` are the parts the model has."""

    def __init__(self, library: LoraLibrary | None, set_edit, components: tuple[str, ...]):
        self.library = library
        self._set_edit = set_edit
        self._components = components
        self._key: tuple = ()
        self._edits: dict[str, LoraEdit] = {}
        self._files: list[LoraFile] = []
        # Seconds each part's last graph update (a reload with new branches) took, filled in as parts load.
        self.updates: dict[str, float] = {}
        self._pending: set[str] = set()
        self._first_run: set[str] = set()

    def activate(self, prompt: str, negative_prompt: str = "") -> list[LoraFile]:
        """Use the LoRAs ``prompt`` names (none: the plain graphs); returns their files, in tag order. LoRA tags in
        the negative prompt are not applied (as in A1111), and a warning says so."""
        if parse_lora_tags(negative_prompt):
            warnings.warn("LoRA tags in the negative prompt are not applied; put them in the prompt", SdliteWarning, 2)
        uses = parse_lora_tags(prompt)
        if uses and self.library is None:
            raise InputError(f"LoRA {uses[0].name!r}: the prompt names a LoRA but no LoRA folder is given (--lora-dir)")
        files = [self.library.get(use.name) for use in uses]
        for file in files:
            for component in file.layers:
                if component not in self._components:
                    raise InputError(
                        f"LoRA {file.name!r} changes {component}, which this model lacks (a LoRA for another family?)"
                    )
        key = tuple((file.path, use.dyn) for file, use in zip(files, uses, strict=True))
        if key != self._key:
            self._rebuild(files, uses)
            self._key = key
        for component, edit in self._edits.items():
            attribute = _COMPONENT_MULTIPLIER[component]
            for lora in edit.loras:
                edit.multipliers[lora.slot] = getattr(uses[lora.slot], attribute)
        self._files = files
        return files

    def _rebuild(self, files: list[LoraFile], uses: list[LoraUse]) -> None:
        edits = {}
        for component in COMPONENTS:
            loras = [
                SlotLayers(file.name, slot, file.layers[component], file.alphas.get(component), use.dyn)
                for slot, (file, use) in enumerate(zip(files, uses, strict=True))
                if component in file.layers
            ]
            if loras:
                edits[component] = LoraEdit(component, loras, len(files))
        for component in self._components:
            if component in edits or component in self._edits:
                self._set_edit(component, edits.get(component))
                self._pending.add(component)
        self._edits = edits

    def hashes(self) -> str | None:
        """The infotext's "Lora hashes" value for the LoRAs in use (A1111's format), None without any."""
        if not self._files:
            return None
        return ", ".join(f"{file.name.replace(':', '').replace(',', '')}: {file.a1111_hash}" for file in self._files)

    def after(self, part: str, action: str, seconds: float) -> None:
        """Part-pool observer: a part's graph update is its first load after its branches changed (reading and
        editing the graph) plus its first run (where OpenVINO compiles it; one inference besides)."""
        if action == "load" and part in self._pending:
            self._pending.discard(part)
            self.updates[part] = seconds
            self._first_run.add(part)
        elif action == "run" and part in self._first_run:
            self._first_run.discard(part)
            self.updates[part] += seconds
