"""Build a Hugging Face style CLIP tokenizer folder from the BPE file shipped with sdlite.

Stable Diffusion 1.x/2.x use OpenAI CLIP's byte-level BPE.  Its merge list ships as
``data/bpe_simple_vocab_16e6.txt.gz`` (the file OpenAI CLIP and open_clip distribute).  The
vocabulary is not stored in that file; CLIP derives it from the merges, and this module does
the same so that a converted model folder can carry a complete ``tokenizer/`` directory that
both ``transformers.CLIPTokenizer`` and ``sdlite.tokenizer.CLIPTokenizer`` load.

No torch (and no transformers) is imported here: this runs in the lightweight runtime too.
"""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

BPE_PATH = Path(__file__).resolve().parent / "data" / "bpe_simple_vocab_16e6.txt.gz"

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77

# CLIP keeps the first 49152 - 256 - 2 merges of the file: 49152 was the intended vocabulary
# size, minus the 256 byte symbols and the two special tokens (the "</w>" variants of the byte
# symbols were added on top, which is why the real vocabulary has 49408 entries).
NUM_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character, as GPT-2/CLIP byte-level BPE does.

    Printable Latin-1 bytes map to themselves; the remaining 68 bytes (control chars, space,
    etc.) map to U+0100 onwards, in byte order.  The dict's insertion order is the order of
    the first 256 vocabulary entries, so it matters.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@lru_cache(maxsize=1)
def load_clip_merges(bpe_path: str | None = None) -> tuple[tuple[str, str], ...]:
    """Return CLIP's 48,894 merges (pairs of symbols) read from the gzip'd BPE file."""
    path = Path(bpe_path) if bpe_path else BPE_PATH
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    # Line 0 is a header ('"bpe_simple_vocab_16e6.txt#version: 0.2'), not a merge.
    merges = tuple(tuple(line.split()) for line in lines[1 : NUM_MERGES + 1])
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path} does not look like CLIP's BPE merge file")
    return merges  # type: ignore[return-value]


def build_clip_vocab(merges: tuple[tuple[str, str], ...]) -> dict[str, int]:
    """Derive CLIP's token -> id table from its merges (49,408 entries)."""
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols]
    tokens += ["".join(pair) for pair in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("duplicate token while building the CLIP vocabulary")
    return vocab


def write_clip_tokenizer(out_dir: str | Path, pad_token: str = EOS_TOKEN) -> None:
    """Write a ``tokenizer/`` folder for CLIP in the layout transformers/diffusers expect.

    Files: ``vocab.json``, ``merges.txt`` (with the ``#version: 0.2`` header, because the slow
    transformers tokenizer unconditionally skips the first line), ``special_tokens_map.json``
    and ``tokenizer_config.json``.

    ``pad_token`` is ``"<|endoftext|>"`` for SD 1.x and ``"!"`` for SD 2.x.  ``model_max_length``
    is written as 77: diffusers pads prompts to ``tokenizer.model_max_length``, and without it
    transformers would report a huge sentinel value.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    merges = load_clip_merges()
    vocab = build_clip_vocab(merges)
    if pad_token not in vocab:
        raise ValueError(f"pad_token {pad_token!r} is not in the CLIP vocabulary")

    with open(out / "vocab.json", "w", encoding="utf-8") as fh:
        json.dump(vocab, fh, ensure_ascii=False)
        fh.write("\n")
    with open(out / "merges.txt", "w", encoding="utf-8") as fh:
        fh.write("#version: 0.2\n")
        fh.write("\n".join(" ".join(pair) for pair in merges))
        fh.write("\n")

    special = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
        "pad_token": pad_token,
    }
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        **special,
    }
    with open(out / "special_tokens_map.json", "w", encoding="utf-8") as fh:
        json.dump(special, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
    with open(out / "tokenizer_config.json", "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
