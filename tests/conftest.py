"""Shared fixtures: the tiny model as a diffusers folder and converted by sdlite (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_diffusers(tmp_path_factory) -> Path:
    """The ``tiny`` recipe saved as a diffusers folder."""
    from sdlite.models.recipes import build

    return build("tiny", tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_onnx(tiny_diffusers, tmp_path_factory) -> Path:
    """The tiny model converted to ONNX fp32 by ``sdlite.convert``."""
    from sdlite.convert.converter import convert

    out = tmp_path_factory.mktemp("converted") / "tiny-onnx"
    convert(str(tiny_diffusers), out, quiet=True)
    return out
