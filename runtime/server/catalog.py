"""The models a server offers: converted-model folders, named as AUTOMATIC1111 names its checkpoints.

A1111 clients list ``/sdapi/v1/sd-models`` and switch by posting one of its ``title`` values back as
``sd_model_checkpoint``; the title here is ``name [hash]`` (the first 10 hex digits of the source checkpoint's
sha256, A1111's short hash). A model is only ever looked up among the listed folders, so a name sent by a client
cannot point anywhere else on disk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sdlite.errors import InputError
from sdlite.hashing import short_hash
from sdlite.layout import MODEL_INDEX
from sdlite.model_folder import ModelFolder


@dataclass(frozen=True)
class ModelEntry:
    """One converted-model folder the server can load."""

    name: str
    path: Path
    sha256: str | None
    default_size: tuple[int, int]
    # The manifest's generation defaults (a few-step model's steps, cfg_scale, ...): for requests that give none.
    defaults: dict = field(default_factory=dict, compare=False)

    @property
    def hash(self) -> str | None:
        """A1111's short hash (10 hex digits) of the source checkpoint, when known."""
        return short_hash(self.sha256) if self.sha256 else None

    @property
    def title(self) -> str:
        """The name clients show and post back (``sd_model_checkpoint``)."""
        return f"{self.name} [{self.hash}]" if self.hash else self.name

    def describe(self) -> dict:
        """The entry as A1111's ``/sdapi/v1/sd-models`` lists a checkpoint."""
        return {
            "title": self.title,
            "model_name": self.name,
            "hash": self.hash,
            "sha256": self.sha256,
            "filename": str(self.path),
            "config": None,
        }


def _entry(path: Path) -> ModelEntry:
    folder = ModelFolder.open(path)
    manifest = folder.manifest
    size = tuple(manifest.default_size)
    return ModelEntry(manifest.name or path.name, path.resolve(), folder.model_hash, size, manifest.defaults)


class Catalog:
    """The models given on the command line (``-m``) and the converted folders found in ``--models DIR``."""

    def __init__(self, models: list[Path], models_dir: Path | None = None):
        self.models_dir = models_dir
        self._given = [_entry(Path(path)) for path in models]
        if models_dir is not None and not Path(models_dir).is_dir():
            raise InputError(f"--models {models_dir}: folder not found")
        self.entries = self._scan()
        if not self.entries:
            raise InputError(
                f"--models {models_dir}: no converted model folders in it (convert one with sdlite convert)"
            )

    def _scan(self) -> list[ModelEntry]:
        found = list(self._given)
        if self.models_dir is not None:
            for path in sorted(Path(self.models_dir).iterdir()):
                if (path / MODEL_INDEX).is_file():
                    try:
                        found.append(_entry(path))
                    except InputError:
                        continue  # a broken folder is not offered; the others still are
        unique: dict[Path, ModelEntry] = {}
        for entry in found:
            unique.setdefault(entry.path, entry)
        return list(unique.values())

    def refresh(self) -> None:
        """Look in the models folder again (A1111's ``refresh-checkpoints``)."""
        self.entries = self._scan() or self.entries

    def find(self, name: str, field: str = "sd_model_checkpoint") -> ModelEntry:
        """The entry a client names by title, model name, folder name or short hash; InputError naming the
        request's ``field`` if none."""
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"{field} {name!r}: must name a model from /sdapi/v1/sd-models")
        wanted = name.strip()
        base = wanted.rsplit(" [", 1)[0] if wanted.endswith("]") else wanted
        for entry in self.entries:
            if wanted in (entry.title, entry.hash, entry.sha256) or base in (entry.name, entry.path.name):
                return entry
        known = ", ".join(entry.title for entry in self.entries)
        raise InputError(f"{field} {name!r}: unknown model; known: {known}")
