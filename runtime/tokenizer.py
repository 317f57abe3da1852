"""CLIP tokenizer for the torch-free runtime.

Stable Diffusion pipelines in diffusers tokenize prompts with the *slow*
``transformers.CLIPTokenizer``.  The text encoder was trained on whatever ids that produces, so the
runtime must reproduce them exactly, without importing transformers or torch.

What the slow tokenizer does (when ``ftfy`` is not installed, which is the common case):

1. Split the raw text on its special tokens (bos/eos/unk/pad and any added token), exactly and
   case-sensitively; those become their ids directly.
2. For every other piece, run BERT's ``BasicTokenizer(strip_accents=False,
   do_split_on_punc=False)``: drop NUL, U+FFFD and control/format/private-use characters, turn
   whitespace into spaces, put spaces around CJK ideographs, NFC-normalize, split on whitespace,
   lowercase each word, and join the words with single spaces.
3. Split that with CLIP's regex (contractions, runs of letters, single digits, runs of other
   symbols, and the literal ``<|startoftext|>`` / ``<|endoftext|>``).
4. Map each piece's UTF-8 bytes to printable characters (byte-level BPE), and run BPE with
   ``</w>`` marking the end of the piece.  A piece equal to a special-token literal maps straight
   to that token's id (the slow tokenizer seeds its BPE cache with them).

Steps 3 and 4 are done by the Rust ``tokenizers`` library (``Split`` + ``ByteLevel``
pre-tokenizers and a ``BPE`` model).  Steps 1 and 2 are done here in Python because
``tokenizers``' normalizers do not match BasicTokenizer's character classes and its added-token
matching runs before our normalization rather than after.
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

__all__ = ["CLIPTokenizer"]

_DEFAULT_BOS = "<|startoftext|>"
_DEFAULT_EOS = "<|endoftext|>"
_DEFAULT_MAX_LENGTH = 77
# transformers writes 1e30 (VERY_LARGE_INTEGER) when a tokenizer has no max length; treat any
# such value as "not configured" rather than padding to it.
_MAX_SANE_LENGTH = 1_000_000
# The slow tokenizer reads merges.txt as lines[1 : 49152 - 256 - 2 + 1]: it always skips the
# first line (the "#version" header) and keeps at most this many merges.
_MAX_MERGES = 49152 - 256 - 2

# CLIP's pre-tokenization regex (OpenAI CLIP / transformers), compiled by tokenizers' Oniguruma
# engine, which understands \p{L} and \p{N}.  transformers compiles it with re.IGNORECASE, and
# that still matters after lowercasing: "'ſ" (long s) matches the "'s" alternative.  The ignore-case
# flag is scoped to the literal alternatives because Oniguruma and the `regex` module disagree on
# case-folded *classes* (see _REGEX_SKIPPED); otherwise the two agree on every code point that
# Python's Unicode database assigns (checked one by one against the `regex` module that
# transformers uses; unassigned ones never get here, BasicTokenizer's cleaning drops them).
_CLIP_PATTERN = (
    r"(?i:<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)
# Characters that transformers' regex matches with none of its alternatives, so they vanish and
# split the text like a space would.  U+0345 COMBINING GREEK YPOGEGRAMMENI case-folds to a letter
# (iota), so under re.IGNORECASE it falls outside [^\s\p{L}\p{N}] yet is not matched by [\p{L}].
_REGEX_SKIPPED = "\u0345"


def _is_cjk(cp: int) -> bool:
    """BasicTokenizer's notion of a "Chinese character" (CJK Unified Ideographs blocks only)."""
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B820 <= cp <= 0x2CEAF
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


class _CleanTable(dict):
    """``str.translate`` table doing BasicTokenizer's ``_clean_text`` + ``_tokenize_chinese_chars``.

    Both steps are per-character, so one translate pass does them; entries are computed lazily
    per code point and memoized, which keeps the per-prompt cost in C after the first few calls.
    """

    def __missing__(self, cp: int) -> str | None:
        ch = chr(cp)
        cat = unicodedata.category(ch)
        if cp == 0 or cp == 0xFFFD:
            out: str | None = None
        elif ch in " \t\n\r" or cat == "Zs":
            # \t \n \r are category Cc but BasicTokenizer treats them as whitespace.
            out = " "
        elif cat.startswith("C"):
            # Cc, Cf (e.g. zero-width joiner), Co (private use), Cs (lone surrogates), Cn
            # (unassigned) are all dropped.
            out = None
        elif _is_cjk(cp):
            out = f" {ch} "
        else:
            out = ch
        self[cp] = out
        return out


def _basic_normalize(text: str, table: _CleanTable) -> str:
    """Mirror ``BasicTokenizer(strip_accents=False, do_split_on_punc=False).tokenize`` + join."""
    text = text.translate(table)
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    # str.split() is what BasicTokenizer uses; it also splits on a few characters that are not
    # mapped to spaces above (e.g. U+2028).  Lowercasing per word (not the whole string) matches
    # it exactly, e.g. for the context-dependent final sigma.
    text = " ".join(word.lower() for word in text.split())
    # After NFC and lowercasing (NFC composes U+0345 with Greek vowels): see _REGEX_SKIPPED.
    if _REGEX_SKIPPED in text:
        text = text.replace(_REGEX_SKIPPED, " ")
    return text


def _token_content(value: object) -> str | None:
    """A special token from a tokenizer json file: a string, or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} should contain a JSON object")
    return data


class CLIPTokenizer:
    """Byte-level BPE tokenizer producing the same ids as transformers' slow ``CLIPTokenizer``.

    Build it with :meth:`from_folder`.  ``tokenizer(prompts)`` returns the ``(batch, 77)`` int64
    array that diffusers feeds to the text encoder.
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        *,
        bos_token: str = _DEFAULT_BOS,
        eos_token: str = _DEFAULT_EOS,
        unk_token: str = _DEFAULT_EOS,
        pad_token: str = _DEFAULT_EOS,
        model_max_length: int = _DEFAULT_MAX_LENGTH,
        added_tokens: dict[str, int] | None = None,
    ) -> None:
        for name, tok in (("bos_token", bos_token), ("eos_token", eos_token), ("unk_token", unk_token)):
            if tok not in vocab:
                raise ValueError(f"{name} {tok!r} is not in the vocabulary")
        if model_max_length < 2:
            raise ValueError(f"model_max_length must be at least 2 (bos + eos), got {model_max_length}")

        # Tokens that the slow tokenizer cuts out of the raw text before anything else.
        self._added: dict[str, int] = dict(added_tokens or {})
        for tok in (bos_token, eos_token, unk_token, pad_token):
            if tok not in self._added:
                if tok not in vocab:
                    raise ValueError(f"special token {tok!r} is not in the vocabulary")
                self._added[tok] = vocab[tok]

        self.model_max_length = int(model_max_length)
        self.bos_token_id = self._added[bos_token]
        self.eos_token_id = self._added[eos_token]
        self.pad_token_id = self._added[pad_token]
        self.vocab_size = len(vocab)

        # Longest first so that, at a given position, the longest added token wins (as the
        # trie in transformers does).
        alternatives = sorted(self._added, key=len, reverse=True)
        self._added_re = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")")

        # Pieces of CLIP's regex that bypass BPE: the slow tokenizer's BPE cache maps them to
        # themselves, hence to their vocabulary ids.  They can appear after normalization even
        # when not literally in the raw text ("<|EndOfText|>" lowercased).
        self._literal_ids = {t: vocab[t] for t in (_DEFAULT_BOS, _DEFAULT_EOS) if t in vocab}

        bpe = models.BPE(
            vocab,
            merges,
            unk_token=unk_token,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
        )
        tk = Tokenizer(bpe)
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                # BasicTokenizer's output is words joined by single spaces; the spaces separate
                # words and never become tokens.
                pre_tokenizers.WhitespaceSplit(),
                pre_tokenizers.Split(Regex(_CLIP_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        self._tk = tk
        self._clean_table = _CleanTable()

    @classmethod
    def from_folder(cls, path: str | Path) -> CLIPTokenizer:
        """Load a diffusers/optimum ``tokenizer/`` folder.

        Needs ``vocab.json`` and ``merges.txt``; ``special_tokens_map.json`` and
        ``tokenizer_config.json`` are optional and supply the special tokens (pad is ``"!"`` for
        SD 2.x) and ``model_max_length`` (77 when absent).
        """
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"tokenizer folder not found: {folder}")
        vocab_path = folder / "vocab.json"
        merges_path = folder / "merges.txt"
        for required in (vocab_path, merges_path):
            if not required.is_file():
                raise FileNotFoundError(
                    f"CLIP tokenizer folder {folder} has no {required.name} "
                    "(a tokenizer folder needs vocab.json and merges.txt)"
                )

        vocab = _read_json(vocab_path)
        if not all(isinstance(v, int) for v in vocab.values()):
            raise ValueError(f"{vocab_path} should map tokens to integer ids")

        with open(merges_path, encoding="utf-8") as fh:
            lines = fh.read().strip().split("\n")
        merges: list[tuple[str, str]] = []
        for lineno, line in enumerate(lines[1 : _MAX_MERGES + 1], start=2):
            parts = line.split()
            if len(parts) != 2:
                raise ValueError(f"{merges_path}:{lineno}: expected two symbols, got {line!r}")
            merges.append((parts[0], parts[1]))

        config: dict = {}
        specials: dict[str, str] = {}
        config_path = folder / "tokenizer_config.json"
        if config_path.is_file():
            config = _read_json(config_path)
        map_path = folder / "special_tokens_map.json"
        special_map = _read_json(map_path) if map_path.is_file() else {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            # special_tokens_map.json takes precedence, as in transformers.
            for source in (special_map, config):
                content = _token_content(source.get(name))
                if content is not None:
                    specials[name] = content
                    break

        added: dict[str, int] = {}
        added_path = folder / "added_tokens.json"
        if added_path.is_file():
            added.update({str(k): int(v) for k, v in _read_json(added_path).items()})
        for idx, value in (config.get("added_tokens_decoder") or {}).items():
            content = _token_content(value)
            if content is not None:
                added[content] = int(idx)

        max_length = config.get("model_max_length")
        if not isinstance(max_length, (int, float)) or not 2 <= max_length <= _MAX_SANE_LENGTH:
            max_length = _DEFAULT_MAX_LENGTH
        return cls(vocab, merges, model_max_length=int(max_length), added_tokens=added, **specials)

    def _encode_piece(self, text: str) -> list[int]:
        """Ids of a piece of text that holds no added token (steps 2-4 of the module doc)."""
        norm = _basic_normalize(text, self._clean_table)
        if not norm:
            return []
        if "<|" not in norm or not any(t in norm for t in self._literal_ids):
            return self._tk.encode(norm, add_special_tokens=False).ids
        # Rare: a special-token literal survives normalization.  Pre-tokenize, then BPE piece
        # by piece so that such a piece can map to its id instead of being BPE'd.
        ids: list[int] = []
        model = self._tk.model
        for piece, _ in self._tk.pre_tokenizer.pre_tokenize_str(norm):
            # Byte-level mapping leaves these printable-ASCII literals unchanged.
            literal = self._literal_ids.get(piece)
            if literal is not None:
                ids.append(literal)
            else:
                ids.extend(tok.id for tok in model.tokenize(piece))
        return ids

    def tokenize(self, text: str) -> list[int]:
        """BPE ids of ``text``, without bos/eos and without truncation."""
        ids: list[int] = []
        for i, part in enumerate(self._added_re.split(text)):
            # re.split with one capture group alternates text, token, text, ...
            if i % 2:
                ids.append(self._added[part])
            elif part:
                ids.extend(self._encode_piece(part))
        return ids

    def __call__(self, texts: str | list[str]) -> np.ndarray:
        """Model input ids, shape ``(batch, model_max_length)``, dtype int64.

        Each row is bos, the first ``model_max_length - 2`` ids, eos, then pad ids; this equals
        ``CLIPTokenizer(texts, padding="max_length", max_length=77, truncation=True).input_ids``.
        """
        if isinstance(texts, str):
            texts = [texts]
        length = self.model_max_length
        out = np.full((len(texts), length), self.pad_token_id, dtype=np.int64)
        for row, text in enumerate(texts):
            ids = self.tokenize(text)[: length - 2]
            out[row, 0] = self.bos_token_id
            out[row, 1 : len(ids) + 1] = ids
            out[row, len(ids) + 1] = self.eos_token_id
        return out
