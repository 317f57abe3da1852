"""Generation parameters in AUTOMATIC1111's infotext format, as other tools read them from PNGs.

Format: ``<prompt>\\nNegative prompt: <negative>\\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1,
Size: 512x512, Model hash: <10 hex>, Model: <name>, <extra keys>``. The negative-prompt line is left
out when there is none, as A1111 does; values holding ``,``, ``:`` or ``"`` are JSON-quoted so readers
split the key/value list correctly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping


def _format_value(value: object) -> str:
    if isinstance(value, float):
        value = f"{value:g}"
    text = str(value)
    if any(ch in text for ch in ',:"\n'):
        return json.dumps(text, ensure_ascii=False)
    return text


def format_infotext(prompt: str, negative_prompt: str, parameters: Mapping[str, object]) -> str:
    """Build the infotext string; ``parameters`` keeps its order, and ``None`` values are left out."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {_format_value(value)}" for key, value in parameters.items() if value is not None))
    return "\n".join(lines)


# One "Key: value" pair of the parameters line; a value is a JSON string or runs to the next comma.
_PAIR = re.compile(r'\s*([\w][\w \-/+()]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_NEGATIVE = "Negative prompt:"
# A last line with fewer pairs than this is part of the prompt (A1111 reads it the same way).
_MIN_PAIRS = 3


def _parameters(line: str) -> dict[str, str] | None:
    """The key/value pairs of a parameters line, or None when the line is not one."""
    pairs = _PAIR.findall(line)
    if len(pairs) < _MIN_PAIRS:
        return None
    return {key.strip(): _value(value) for key, value in pairs}


def _value(text: str) -> str:
    """A parameter's value: JSON-quoted values unquoted (as written, spaces kept), others stripped."""
    if len(text) >= 2 and text.startswith('"') and text.endswith('"'):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return text
        if isinstance(value, str):
            return value
    return text.strip()


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """Read an infotext (what :func:`format_infotext` and AUTOMATIC1111 write) back into (prompt, negative
    prompt, parameters as strings). Text that has no parameters line is all prompt."""
    lines = str(text).strip().split("\n")
    params = _parameters(lines[-1]) if len(lines) > 1 or _PAIR.match(lines[-1]) else None
    if params is not None:
        lines = lines[:-1]
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith(_NEGATIVE):
            in_negative = True
            line = line[len(_NEGATIVE) :].lstrip(" ")
        (negative if in_negative else prompt).append(line)
    return "\n".join(prompt), "\n".join(negative), params or {}
