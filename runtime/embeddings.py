"""Textual-inversion embeddings (Gal et al. 2022), used by name in the prompt as AUTOMATIC1111 uses them.

An embedding is N learned token vectors of the text encoder's width. ``--embeddings DIR`` loads every
``.safetensors`` file under DIR; writing an embedding's name in a prompt puts its N vectors where the name
was, as N token positions that count against the 75-token chunk and take the emphasis of the text around
them. Nothing is converted: when the text encoder loads, the engine appends the vectors as new rows to
its token-embedding table (``sdlite.engines.token_table``), and the name's tokens are replaced by the ids
of those rows. The exported graph itself never changes, so folders stay loadable by optimum.

Layouts read:

- AUTOMATIC1111: a tensor ``emb_params`` of shape (N, width); the name is the file's stem.
- diffusers (``learned_embeds.safetensors``): one tensor whose key is the token, e.g. ``<cat-toy>``, of
  shape (N, width) or (width,); the prompt may use the token or the file's stem.

- SDXL (A1111 and diffusers): tensors ``clip_l`` (the first text encoder's vectors) and ``clip_g`` (the second's);
  each encoder of an SDXL model reads its own, and both put the same number of tokens in the same places.

Names match as A1111 matches them: the name is tokenized like prompt text, and wherever a piece of the
prompt tokenizes to that same run of tokens the embedding replaces it (so case does not matter, and the
longest name wins when several start with the same token); a name written between punctuation, such as
``<cat-toy>``, is also found when more punctuation follows it. An embedding that does not fit in what is
left of a chunk starts the next one; it is never split. Files that cannot serve this model (another
width, an SDXL pair on a one-encoder model or the reverse, a pickle, a name two files share) only fail when a
prompt uses them, so one folder
can hold embeddings for several model families; a file that is not an embedding at all fails at load.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdlite.errors import InputError
from sdlite.hashing import sha256_file
from sdlite.safetensors_file import PICKLE_SUFFIXES, read_safetensors

__all__ = ["Embedding", "EmbeddingLibrary", "read_embedding", "ti_hashes"]

A1111_KEY = "emb_params"
# AUTOMATIC1111's .pt layout, occasionally re-saved as safetensors with the nested key flattened.
A1111_PT_KEY = "string_to_param.*"
SDXL_KEYS = {"clip_l", "clip_g"}
# An embedding must fit in one 75-token chunk (A1111 never splits one).
MAX_VECTORS = 75
# Embeddings are kilobytes; a file with more tensor data than this is a checkpoint or LoRA put in the
# wrong folder, and is refused before it is read into memory.
MAX_FILE_BYTES = 16 << 20
# Which family a text-encoder width usually means, for the width-mismatch message.
_FAMILY_BY_WIDTH = {768: "SD 1.x", 1024: "SD 2.x", 1280: "SDXL's second encoder"}
# A name that starts and ends with punctuation, such as diffusers' "<cat-toy>".
_LITERAL = re.compile(r"[^\w\s].*[^\w\s]", re.DOTALL)


def _width_hint(width: int) -> str:
    family = _FAMILY_BY_WIDTH.get(width)
    return f" ({family})" if family else ""


@dataclass(frozen=True, eq=False)  # compared by identity: one object per file, and arrays do not hash
class Embedding:
    """One usable embedding: its vectors (N, width) and where their rows sit in the extended table."""

    name: str
    path: Path
    vectors: np.ndarray
    sha256: str
    first_id: int

    @property
    def ids(self) -> tuple[int, ...]:
        """The token ids that stand for the vectors in the extended table."""
        return tuple(range(self.first_id, self.first_id + len(self.vectors)))

    @property
    def short_hash(self) -> str:
        """AUTOMATIC1111's short hash of an embedding: the first 12 hex digits of the file's sha256."""
        return self.sha256[:12]


@dataclass(frozen=True)
class _Entry:
    """What one name (as tokens) refers to: an embedding, or the reason it cannot be used here."""

    name: str
    embedding: Embedding | None = None
    problem: str | None = None


def read_embedding(path: str | Path, sdxl_key: str | None = None) -> tuple[dict[str, np.ndarray], str]:
    """The vectors of an embedding file by the names a prompt may use for them, and its layout.

    Returns ``({name: vectors (N, width) float32}, layout)``; raises ``InputError`` for a file that is
    not a textual-inversion embedding in a layout sdlite reads. An SDXL embedding (``clip_l`` and
    ``clip_g``) gives the vectors of ``sdxl_key`` (one of them), or none without it, with layout ``"sdxl"``,
    so that the caller can say why it does not fit."""
    path = Path(path)
    tensors, _ = read_safetensors(path, max_bytes=MAX_FILE_BYTES)
    stem = path.stem
    if A1111_KEY in tensors:
        found, layout = {stem: tensors[A1111_KEY]}, "a1111"
    elif A1111_PT_KEY in tensors:
        found, layout = {stem: tensors[A1111_PT_KEY]}, "a1111"
    elif tensors.keys() >= SDXL_KEYS:
        if sdxl_key is None:
            return {}, "sdxl"
        found, layout = {stem: tensors[sdxl_key]}, "sdxl"
    elif len(tensors) == 1:
        ((token, vectors),) = tensors.items()
        found, layout = {token: vectors, stem: vectors}, "diffusers"
    else:
        keys = ", ".join(sorted(tensors)[:5]) or "none"
        raise InputError(
            f"{path}: not a textual-inversion embedding: expected a tensor {A1111_KEY!r} (AUTOMATIC1111) or "
            f"exactly one tensor named by its token (diffusers); found {keys}"
        )
    checked = {}
    for name, vectors in found.items():
        if vectors.ndim == 1:
            vectors = vectors[None]  # diffusers saves a single vector without the token axis
        if vectors.ndim != 2 or vectors.shape[0] == 0 or not np.issubdtype(vectors.dtype, np.floating):
            raise InputError(
                f"{path}: not a textual-inversion embedding: expected float vectors (N, width), "
                f"found {vectors.dtype} {list(vectors.shape)}"
            )
        if not np.all(np.isfinite(vectors)):
            raise InputError(f"{path}: corrupt embedding: its vectors hold NaN or infinite values")
        checked[name] = vectors.astype(np.float32)
    return checked, layout


class EmbeddingLibrary:
    """Every embedding under a folder, matched in prompts by the tokens of its name."""

    def __init__(self, entries: dict[tuple[int, ...], _Entry], embeddings: list[Embedding], first_id: int):
        self._entries = entries
        self.embeddings = embeddings
        self.first_id = first_id
        # A1111's lookup: the names that start with a token, longest first.
        self._by_first: dict[int, list[tuple[tuple[int, ...], _Entry]]] = {}
        for tokens, entry in sorted(entries.items(), key=lambda item: -len(item[0])):
            self._by_first.setdefault(tokens[0], []).append((tokens, entry))
        # Names written between punctuation, as diffusers' tokens are ("<cat-toy>"), stop tokenizing like
        # the name when punctuation follows them ("<cat-toy>," ends in the token ">," not ">"); such names
        # are cut out of the text literally first, as diffusers' tokenizer cuts out its added tokens.
        # Names that start or end with a letter or digit match by tokens only, as in A1111.
        literal = sorted((e.name for e in entries.values() if _LITERAL.fullmatch(e.name)), key=len, reverse=True)
        self._literal = re.compile("(" + "|".join(map(re.escape, literal)) + ")") if literal else None

    @classmethod
    def load(
        cls,
        folder: str | Path,
        tokenize: Callable[[str], list[int]],
        first_id: int,
        width: int | None,
        sdxl_key: str | None = None,
    ) -> EmbeddingLibrary:
        """Read every embedding under ``folder`` (subfolders too). ``tokenize`` is the prompt tokenizer,
        ``first_id`` the size of the text encoder's token table (the first new row's id) and ``width`` its
        width (``None``: unknown, the engine checks it when it extends the table). For an encoder of an SDXL
        model, ``sdxl_key`` (``clip_l`` or ``clip_g``) names its vectors in SDXL embeddings, and one-encoder
        embeddings cannot serve it."""
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"--embeddings {folder}: folder not found")
        named: dict[tuple[int, ...], list[tuple[str, Path, np.ndarray | None, str | None]]] = {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
            suffix = path.suffix.lower()
            if suffix in PICKLE_SUFFIXES:
                problem = (
                    f"embedding {path.stem!r} ({path}) is a pickle, which can run code when loaded; sdlite "
                    "reads .safetensors embeddings only (re-save it as .safetensors in a trusted environment)"
                )
                found: dict[str, np.ndarray | None] = {path.stem: None}
            elif suffix == ".safetensors":
                vectors_by_name, layout = read_embedding(path, sdxl_key)
                found, problem = dict(vectors_by_name), None
                if (layout == "sdxl") != (sdxl_key is not None):
                    found = {name: None for name in found} or {path.stem: None}
                    problem = (
                        f"embedding {path.stem!r} ({path}) is an SDXL embedding (clip_l and clip_g vectors); "
                        "this model has one text encoder"
                        if sdxl_key is None
                        else f"embedding {path.stem!r} ({path}) has one text encoder's vectors (SD 1.x/2.x); this "
                        "SDXL model needs clip_l and clip_g vectors"
                    )
            else:
                continue  # previews, notes, and other files that often sit next to embeddings
            for name, vectors in found.items():
                tokens = tuple(tokenize(name))
                if tokens:
                    named.setdefault(tokens, []).append((name, path, vectors, problem))
        entries: dict[tuple[int, ...], _Entry] = {}
        embeddings: list[Embedding] = []
        by_path: dict[Path, Embedding] = {}
        next_id = first_id
        for tokens, candidates in named.items():
            paths = sorted({str(path) for _, path, _, _ in candidates})
            name, path, vectors, problem = candidates[0]
            if len(paths) > 1:
                entries[tokens] = _Entry(name, problem=f"embedding name {name!r} is used by {' and '.join(paths)}")
                continue
            if problem is None and vectors is not None:
                problem = _fit_problem(name, path, vectors, width)
            if problem is not None:
                entries[tokens] = _Entry(name, problem=problem)
                continue
            embedding = by_path.get(path)
            if embedding is None:
                embedding = Embedding(name, path, vectors, sha256_file(path), next_id)
                next_id += len(vectors)
                by_path[path] = embedding
                embeddings.append(embedding)
            entries[tokens] = _Entry(name, embedding=embedding)
        return cls(entries, embeddings, first_id)

    @property
    def rows(self) -> np.ndarray:
        """Every usable embedding's vectors in id order: the rows appended to the token table."""
        if not self.embeddings:
            return np.zeros((0, 0), np.float32)
        widths = sorted({e.vectors.shape[1] for e in self.embeddings})
        if len(widths) > 1:
            # Only when the model's width was unknown at load, so nothing sorted the files out.
            raise InputError(f"embeddings of several widths ({', '.join(map(str, widths))}) in one folder")
        return np.concatenate([e.vectors for e in self.embeddings]).astype(np.float32)

    def names(self) -> list[str]:
        """The names a prompt can use (usable embeddings only)."""
        return sorted(entry.name for entry in self._entries.values() if entry.embedding is not None)

    def tokenize(self, text: str, tokenize: Callable[[str], list[int]]) -> list[int]:
        """``tokenize(text)``, but with every literal name (see above) tokenized on its own."""
        if self._literal is None:
            return tokenize(text)
        # re.split with one group alternates text, name, text, ...
        return [token for part in self._literal.split(text) if part for token in tokenize(part)]

    def find(self, tokens: Sequence[int], position: int) -> tuple[str, Embedding, int] | None:
        """The embedding whose name's tokens start at ``tokens[position]``: (the name written, the
        embedding, how many prompt tokens the name takes), or None. A name that cannot be used with this
        model raises ``InputError`` saying why."""
        for name_tokens, entry in self._by_first.get(tokens[position], ()):
            if tuple(tokens[position : position + len(name_tokens)]) == name_tokens:
                if entry.embedding is None:
                    raise InputError(entry.problem)
                return entry.name, entry.embedding, len(name_tokens)
        return None


def _fit_problem(name: str, path: Path, vectors: np.ndarray, width: int | None) -> str | None:
    """Why ``vectors`` cannot serve a text encoder of ``width``, or None."""
    count, own = vectors.shape
    if width is not None and own != width:
        return (
            f"embedding {name!r} ({path}) has vectors {own} wide{_width_hint(own)}, but this model's text encoder "
            f"is {width} wide{_width_hint(width)}: the embedding was trained for another model family"
        )
    if count > MAX_VECTORS:
        return f"embedding {name!r} ({path}) has {count} vectors; at most {MAX_VECTORS} fit in a prompt chunk"
    return None


def ti_hashes(used: dict[str, Embedding]) -> str | None:
    """AUTOMATIC1111's ``TI hashes`` infotext value (``name: <12 hex>, ...``), or None when none was used."""
    if not used:
        return None
    # A1111 strips ":" and "," from the names so that the list stays parseable.
    return ", ".join(
        f"{name.replace(':', '').replace(',', '')}: {embedding.short_hash}" for name, embedding in used.items()
    )
