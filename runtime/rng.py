"""Seeded Gaussian noise for the initial latents and stochastic samplers.

A seed names a stream, and a source names the algorithm that turns the seed into numbers, so the
same seed gives the same image only within one source. "numpy" uses numpy's PCG64 generator.
Adding a source (a bit-exact torch CPU stream, say) means one class with ``__init__(seed)`` and
``randn(shape)`` plus an entry in ``_SOURCES``.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral
from typing import Protocol

import numpy as np

_MAX_SEED = 2**64 - 1


class _Source(Protocol):
    def randn(self, shape: tuple[int, ...]) -> np.ndarray: ...


class _NumpySource:
    """numpy's PCG64 bit generator with its ziggurat standard normal, drawn directly in float32."""

    def __init__(self, seed: int) -> None:
        self._generator = np.random.Generator(np.random.PCG64(seed))

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        return self._generator.standard_normal(shape, dtype=np.float32)


_SOURCES: dict[str, type] = {"numpy": _NumpySource}

SOURCES = tuple(_SOURCES)


def _shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    return (int(shape),) if isinstance(shape, Integral) else tuple(int(dim) for dim in shape)


class NoiseGenerator:
    """A stateful stream of float32 standard normal noise: successive ``randn`` calls continue the stream."""

    def __init__(self, seed: int, source: str = "numpy") -> None:
        if isinstance(seed, bool) or not isinstance(seed, Integral) or not 0 <= seed <= _MAX_SEED:
            raise ValueError(f"seed {seed!r}: must be an integer from 0 to 2**64 - 1")
        if source not in _SOURCES:
            raise ValueError(f"unknown noise source {source!r}; known sources: {', '.join(SOURCES)}")
        self.seed = int(seed)
        self.source = source
        self._source: _Source = _SOURCES[source](self.seed)

    def randn(self, shape: int | Sequence[int]) -> np.ndarray:
        """Return the next float32 standard normal array of ``shape`` from the stream."""
        return self._source.randn(_shape(shape))


def randn(shape: int | Sequence[int], seed: int, source: str = "numpy") -> np.ndarray:
    """Return a float32 standard normal array of ``shape``: the start of the stream for ``seed``."""
    return NoiseGenerator(seed, source).randn(shape)
