"""Prompts as AUTOMATIC1111 users write them: emphasis, BREAK, and prompts longer than CLIP's 77 tokens.

Syntax (the AUTOMATIC1111 wiki, "Features": Attention/emphasis, BREAK keyword, Infinite prompt length):

- ``(text)`` multiplies the weight of ``text`` by 1.1, ``((text))`` by 1.21, ``[text]`` divides it by 1.1;
  ``(text:1.3)`` sets the factor to 1.3 (a number works in round brackets only).
- ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are the literal characters; any other backslash is dropped.
- A bracket that is never closed applies its factor to the rest of the prompt; a closing bracket that
  was never opened is kept as text.
- ``BREAK`` (upper case, as a word of its own) pads the current chunk and starts a new one.

A prompt becomes chunks of 75 tokens, each wrapped in bos/eos to CLIP's 77. When a chunk fills up and
its last comma lies within the last 20 tokens, the tokens after that comma move to the next chunk, so
that a comma-separated phrase is not cut in half (A1111's setting "Increase coherency by padding from the
last comma within n tokens", default 20). Each chunk goes through the text encoder on its own and the
results are concatenated along the token axis (so the U-Net sees 77 x chunks tokens).

``sdlite.conditioning`` runs the chunks through the text encoder.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sdlite.errors import InputError

__all__ = [
    "BREAK",
    "Chunk",
    "EmbeddingLookup",
    "parse_prompt",
    "prompt_chunks",
]

BREAK = "BREAK"
# The weight AUTOMATIC1111 gives its BREAK marker: the piece ("BREAK", -1.0). Plain text never reads
# "BREAK" (it is split out), so text weighted -1 by (text:-1) is not mistaken for a break.
BREAK_WEIGHT = -1.0
ROUND_FACTOR = 1.1
# A1111 multiplies by 1 / 1.1 rather than dividing by 1.1; the two can differ in the last bit, and
# adjacent pieces merge only when their weights are exactly equal.
SQUARE_FACTOR = 1 / 1.1
CHUNK_TOKENS = 75
COMMA_BACKTRACK = 20

# ":" then a number then ")" closes a round bracket with that factor. The number is any run of
# digits and dots (as in A1111), so "1.2.3" is caught here and reported rather than read as text.
_WEIGHT_CLOSE = re.compile(r":\s*([+-]?[.\d]+)\s*\)")
_SPECIAL = "\\()[]:"
_ESCAPABLE = "()[]\\"
# BREAK as a word of its own, with the whitespace around it.
_BREAK_SPLIT = re.compile(r"\s*\bBREAK\b\s*")

Piece = tuple[str, float]


class _Piece:
    """A piece while parsing: its weight changes as brackets close."""

    __slots__ = ("text", "weight", "is_break")

    def __init__(self, text: str, weight: float = 1.0, is_break: bool = False):
        self.text, self.weight, self.is_break = text, weight, is_break


def _text_pieces(text: str) -> list[_Piece]:
    """Plain text (no bracket syntax) as pieces of weight 1, with a BREAK marker at each BREAK."""
    out: list[_Piece] = []
    for i, part in enumerate(_BREAK_SPLIT.split(text)):
        if i:
            out.append(_Piece(BREAK, BREAK_WEIGHT, is_break=True))
        out.append(_Piece(part))
    return out


def parse_prompt(prompt: str) -> list[Piece]:
    """Split ``prompt`` into (text, weight) pieces; a BREAK is the piece ``("BREAK", -1.0)``.

    Adjacent pieces of equal weight are merged, and empty pieces dropped, so
    ``parse_prompt("a (b) c")`` is ``[("a ", 1.0), ("b", 1.1), (" c", 1.0)]``. A weight that is not a
    number, such as ``(a:1.2.3)``, raises ``InputError``.

    One deliberate difference from A1111: brackets around BREAK do not weight it (A1111 multiplies its
    marker's weight, which turns the BREAK into the word "break" with a negative weight).
    """
    pieces: list[_Piece] = []
    open_round: list[int] = []  # index of the first piece inside each open bracket
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if not piece.is_break:
                piece.weight *= factor

    i, n = 0, len(prompt)
    while i < n:
        char = prompt[i]
        if char == "\\":
            # An escape is its own piece, so it is weighted like the text around it.
            if i + 1 < n and prompt[i + 1] in _ESCAPABLE:
                pieces.append(_Piece(prompt[i + 1]))
                i += 2
            else:
                i += 1  # A1111 drops a backslash that escapes nothing
        elif char == "(":
            open_round.append(len(pieces))
            i += 1
        elif char == "[":
            open_square.append(len(pieces))
            i += 1
        elif char == ":":
            match = _WEIGHT_CLOSE.match(prompt, i)
            if match and open_round:
                try:
                    factor = float(match.group(1))
                except ValueError:
                    raise InputError(
                        f"prompt weight {match.group(1)!r} in {match.group(0)!r} is not a number; "
                        "write it like (text:1.2)"
                    ) from None
                scale(open_round.pop(), factor)
                i = match.end()
            elif match:
                pieces.extend(_text_pieces(match.group(0)))  # no bracket to close: plain text
                i = match.end()
            else:
                pieces.append(_Piece(":"))
                i += 1
        elif char == ")" and open_round:
            scale(open_round.pop(), ROUND_FACTOR)
            i += 1
        elif char == "]" and open_square:
            scale(open_square.pop(), SQUARE_FACTOR)
            i += 1
        elif char in ")]":
            pieces.append(_Piece(char))  # closes nothing: plain text
            i += 1
        else:
            end = i + 1
            while end < n and prompt[end] not in _SPECIAL:
                end += 1
            pieces.extend(_text_pieces(prompt[i:end]))
            i = end
    # Brackets never closed reach to the end of the prompt: round ones first, then square (A1111's order,
    # which fixes the last bit of the product).
    for start in open_round:
        scale(start, ROUND_FACTOR)
    for start in open_square:
        scale(start, SQUARE_FACTOR)

    merged: list[_Piece] = []
    for piece in pieces:
        # Empty pieces take part in merging (they keep A1111's grouping, which decides how the text is
        # tokenized: each piece separately) and are dropped afterwards.
        last = merged[-1] if merged else None
        if last and not (last.is_break or piece.is_break) and last.weight == piece.weight:
            last.text += piece.text
        else:
            merged.append(piece)
    return [(piece.text, piece.weight) for piece in merged if piece.text]


# Finds a textual-inversion embedding whose name's tokens start at ``tokens[position]``: the ids that
# stand for its vectors and how many of ``tokens`` the name takes, or None.
EmbeddingLookup = Callable[[Sequence[int], int], tuple[tuple[int, ...], int] | None]


@dataclass(frozen=True)
class Chunk:
    """One text-encoder input: ``ids`` (77: bos, up to 75 tokens, eos, padding) and a weight per id."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]


def prompt_chunks(
    prompt: str,
    tokenize: Callable[[str], list[int]],
    bos: int,
    eos: int,
    pad: int,
    comma: int | None,
    chunk_tokens: int = CHUNK_TOKENS,
    backtrack: int = COMMA_BACKTRACK,
    embedding_at: EmbeddingLookup | None = None,
) -> list[Chunk]:
    """The chunks of ``prompt`` as AUTOMATIC1111 builds them; always at least one.

    ``tokenize`` maps text to ids without bos/eos; ``comma`` is the id of "," (``None``: no comma rule).
    Each parsed piece is tokenized on its own, as A1111 does. A chunk is padded with eos and then ``pad``
    (SD 1.x pads with eos, SD 2.x with "!"), so a short plain prompt gives exactly the ids diffusers uses.
    ``embedding_at`` finds textual-inversion embeddings among a piece's tokens (``sdlite.embeddings``):
    each takes one position per vector, with the piece's weight, and moves whole to the next chunk when
    it does not fit in the current one.
    """
    chunks: list[Chunk] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1  # index in ``ids`` of the current chunk's last comma

    def close() -> None:
        nonlocal ids, weights, last_comma
        fill = chunk_tokens - len(ids)
        chunks.append(
            Chunk(
                ids=(bos, *ids, eos, *[pad] * fill),
                weights=(1.0, *weights, 1.0, *[1.0] * fill),
            )
        )
        ids, weights, last_comma = [], [], -1

    for text, weight in parse_prompt(prompt):
        if weight == BREAK_WEIGHT and text == BREAK:
            close()
            continue
        tokens = tokenize(text)
        position = 0
        while position < len(tokens):
            token = tokens[position]
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == chunk_tokens and last_comma != -1 and len(ids) - last_comma <= backtrack:
                # The chunk is full and a comma is near its end: the tail after the comma moves on.
                cut = last_comma + 1
                tail_ids, tail_weights = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                close()
                ids, weights = tail_ids, tail_weights
            if len(ids) == chunk_tokens:
                close()
            found = embedding_at(tokens, position) if embedding_at else None
            if found is None:
                ids.append(token)
                weights.append(weight)
                position += 1
                continue
            vector_ids, name_tokens = found
            if len(ids) + len(vector_ids) > chunk_tokens:
                close()  # an embedding is never split across chunks
            ids.extend(vector_ids)
            weights.extend([weight] * len(vector_ids))
            position += name_tokens
    if ids or not chunks:
        close()
    return chunks
