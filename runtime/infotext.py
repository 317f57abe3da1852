"""Generation parameters in AUTOMATIC1111's infotext format, as other tools read them from PNGs.

Format: ``<prompt>\\nNegative prompt: <negative>\\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1,
Size: 512x512, Model hash: <10 hex>, Model: <name>, <extra keys>``. The negative-prompt line is left
out when there is none, as A1111 does; values holding ``,``, ``:`` or ``"`` are JSON-quoted so readers
split the key/value list correctly.
"""

from __future__ import annotations

import json
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
