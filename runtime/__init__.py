"""sdlite: run converted Stable Diffusion models offline, fast and in little memory, without torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["Pipeline", "__version__"]

if TYPE_CHECKING:
    from sdlite.pipeline import Pipeline


def __getattr__(name: str):
    # Imported on first use, so that `sdlite.convert` and `sdlite.models` do not load onnxruntime.
    if name == "Pipeline":
        from sdlite.pipeline import Pipeline

        return Pipeline
    raise AttributeError(f"module 'sdlite' has no attribute {name!r}")
