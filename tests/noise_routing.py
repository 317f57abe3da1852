"""Make diffusers draw its random tensors from sdlite's noise stream, so both sides start from the same noise."""

from __future__ import annotations

import torch

from sdlite.rng import NoiseGenerator


def route_randn(monkeypatch, seed: int, modules) -> None:
    """Replace ``randn_tensor`` in each of ``modules`` by draws, in call order, from sdlite's stream for ``seed``."""
    stream = NoiseGenerator(seed)

    def randn_tensor(shape, *args, **kwargs):
        return torch.from_numpy(stream.randn(tuple(shape)))

    for module in modules:
        monkeypatch.setattr(module, "randn_tensor", randn_tensor)
