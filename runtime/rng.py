"""Seeded Gaussian noise for the initial latents and stochastic samplers.

A seed names a stream, and a source names the algorithm that turns the seed into numbers, so the
same seed gives the same image only within one source. Sources:

- ``"cpu"`` (the default): bit for bit what ``torch.randn(shape, generator=torch.Generator("cpu")
  .manual_seed(seed))`` gives in float32 on x86-64 (torch's AVX2 kernel, which AVX-512 machines run
  too), including successive draws from one generator. This is the noise of diffusers run with a
  CPU generator, ComfyUI's initial noise (always drawn on the CPU) and AUTOMATIC1111's with its
  "Random number generator source" set to CPU (infotext ``RNG: CPU``). torch builds without the AVX2
  kernel (ARM, Apple silicon) round about a third of the values differently in the last bits (at
  most ~2e-6 apart), so they match only to that tolerance.
- ``"nv"``: AUTOMATIC1111's "NV" source (infotext ``RNG: NV``), its numpy imitation of
  ``torch.randn`` on an NVIDIA GPU: Philox 4x32-10 then Box-Muller, as its ``rng_philox.py`` does.
  A1111's default, "GPU", draws on the GPU itself and writes no ``RNG`` key; "nv" is how A1111 lets a
  machine without one get close to those seeds, not bit for bit: A1111's code rounds a constant to
  float32 and lands up to ~3e-7 from the CUDA values its own docstring lists for seed 0.
- ``"numpy"``: numpy's PCG64 with its ziggurat normal; sdlite's own stream, fastest, known to no other tool.

Why ``"cpu"`` is the default: a seed should mean the picture users got elsewhere, and the CPU stream
is the one the tools people compare with share on every x86 machine (GPU streams differ by
vendor). It costs little: on one x86 core (1, 4, 64, 64) takes about 1 ms and (4, 4, 128, 128)
11-15 ms (numpy: 0.2 and 2.4 ms), against a second or more for one UNet step.

Successive ``randn`` calls continue a stream the way the imitated tool does, which is not always
"one long draw cut in pieces": torch's kernel works in blocks of 16 and A1111's Philox generator
starts every call at a new counter offset. Adding a source means one class with ``__init__(seed)``
and ``randn(shape)`` plus an entry in ``_SOURCES``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral
from typing import Protocol

import numpy as np

_MAX_SEED = 2**64 - 1
_U32 = 0xFFFFFFFF
_F32 = np.float32

DEFAULT_SOURCE = "cpu"

# The value AUTOMATIC1111 writes for its "RNG" infotext key (opts.randn_source, left out when it is
# "GPU", its default); "numpy" has no counterpart there.
A1111_RNG = {"cpu": "CPU", "nv": "NV"}


class _Source(Protocol):
    def randn(self, shape: tuple[int, ...]) -> np.ndarray: ...


class _NumpySource:
    """numpy's PCG64 bit generator with its ziggurat standard normal, drawn directly in float32."""

    def __init__(self, seed: int) -> None:
        self._generator = np.random.Generator(np.random.PCG64(seed))

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        return self._generator.standard_normal(shape, dtype=np.float32)


# --- "cpu": torch's CPU generator and normal kernel ----------------------------------------------------


def _mt19937_key(seed: int) -> np.ndarray:
    """MT19937's 624-word initial state for ``seed`` (Matsumoto & Nishimura 1998; the 2002 init_genrand).

    torch's at::mt19937 keeps only the low 32 bits of its 64-bit seed, so seeds that agree there
    (5 and 2**32 + 5, or 2**32 - 1 and 2**64 - 1) give the same stream, as they do in torch.
    """
    key = np.empty(624, dtype=np.uint32)
    word = seed & _U32
    key[0] = word
    for i in range(1, 624):
        word = (1812433253 * (word ^ (word >> 30)) + i) & _U32
        key[i] = word
    return key


def _fma(a: np.ndarray, b: np.ndarray | np.float32, c: np.ndarray | np.float32) -> np.ndarray:
    """float32 ``a * b + c`` rounded once, as an FMA instruction does.

    GCC contracts the multiply-then-add pairs of torch's AVX2 kernel into FMAs, so matching it needs
    them. The float32 product is exact in float64; the float64 sum, rounded again to float32, is right
    unless it landed exactly halfway between two float32 values while the exact sum was not there
    (double rounding). Those rare elements are moved to the side the exact sum lies on.
    """
    p = a.astype(np.float64) * np.asarray(b, dtype=np.float64)
    c64 = np.asarray(c, dtype=np.float64)
    s = p + c64
    out = s.astype(_F32)
    halfway = (s.view(np.uint64) & 0x1FFFFFFF) == 0x10000000
    if halfway.any():
        idx = np.flatnonzero(halfway)
        p_i, c_i, s_i = p.ravel()[idx], np.broadcast_to(c64, s.shape).ravel()[idx], s.ravel()[idx]
        # Knuth's TwoSum: the exact rounding error of s = p + c.
        p_back = s_i - c_i
        err = (p_i - p_back) + (c_i - (s_i - p_back))
        flat = out.reshape(-1)
        r = flat[idx]
        up = np.where(r > s_i, r, np.nextafter(r, _F32(np.inf)))
        down = np.where(r < s_i, r, np.nextafter(r, _F32(-np.inf)))
        flat[idx] = np.where(err > 0, up, np.where(err < 0, down, r))
    return out


# Cephes single-precision coefficients, as avx_mathfun.h (which torch's AVX2 kernel uses) spells them.
_LOG_P = (
    7.0376836292e-2,
    -1.1514610310e-1,
    1.1676998740e-1,
    -1.2420140846e-1,
    1.4249322787e-1,
    -1.6668057665e-1,
    2.0000714765e-1,
    -2.4999993993e-1,
    3.3333331174e-1,
)
_LOG_Q1, _LOG_Q2 = _F32(-2.12194440e-4), _F32(0.693359375)
_SQRT_HALF = _F32(0.707106781186547524)
_FOUR_OVER_PI = _F32(1.27323954473516)
_DP1, _DP2, _DP3 = _F32(-0.78515625), _F32(-2.4187564849853515625e-4), _F32(-3.77489497744594108e-8)
_SIN_P = (_F32(-1.9515295891e-4), _F32(8.3321608736e-3), _F32(-1.6666654611e-1))
_COS_P = (_F32(2.443315711809948e-005), _F32(-1.388731625493765e-003), _F32(4.166664568298827e-002))


def _log_avx(x: np.ndarray) -> np.ndarray:
    """Natural log of float32 ``x`` in (0, 1], operation for operation as avx_mathfun's log256_ps.

    Its clamp of subnormals and NaN for x <= 0 are left out: x >= 2**-24 here.
    """
    bits = x.view(np.int32)
    e = ((bits >> 23) - 0x7F).astype(_F32) + _F32(1)
    m = ((bits & ~0x7F800000) | 0x3F000000).view(_F32)  # the mantissa scaled into [0.5, 1)
    below = m < _SQRT_HALF
    # Cephes keeps m - 1 in [sqrt(1/2) - 1, sqrt(2) - 1]: below sqrt(1/2) it uses 2m - 1 and e - 1.
    x = (m - _F32(1)) + np.where(below, m, _F32(0))
    e = e - np.where(below, _F32(1), _F32(0))
    z = x * x
    y = _fma(x, _F32(_LOG_P[0]), _F32(_LOG_P[1]))
    for coef in _LOG_P[2:]:
        y = _fma(y, x, _F32(coef))
    y = y * x
    y = _fma(y, z, e * _LOG_Q1)
    y = y - z * _F32(0.5)  # z * 0.5 is exact, so the contracted form rounds the same
    return (x + y) + e * _LOG_Q2  # e * Q2 is exact (Q2 has 9 significant bits)


def _sincos_avx(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sin and cos of float32 ``x`` >= 0, operation for operation as avx_mathfun's sincos256_ps (Cephes)."""
    j = (x * _FOUR_OVER_PI).astype(np.int32)  # truncation, as cvttps
    j = (j + 1) & ~1
    y = j.astype(_F32)
    sin_sign = ((j & 4) << 29).view(np.uint32)
    cos_sign = ((~(j - 2) & 4) << 29).view(np.uint32)
    use_sin_poly = (j & 2) == 0
    # Cody-Waite reduction by pi/4 in three parts; y*DP1 and y*DP2 are exact, y*DP3 is fused.
    x = (x + y * _DP1) + y * _DP2
    x = _fma(y, _DP3, x)
    z = x * x
    c = _fma(z, _COS_P[0], _COS_P[1])
    c = _fma(c, z, _COS_P[2])
    c = c * z
    c = _fma(c, z, -(z * _F32(0.5))) + _F32(1)
    s = _fma(z, _SIN_P[0], _SIN_P[1])
    s = _fma(s, z, _SIN_P[2])
    s = s * z
    s = _fma(s, x, x)
    # The selection as the AVX code does it, with its +0.0 arithmetic (which fixes the sign of zeros).
    s_part = np.where(use_sin_poly, s, _F32(0))
    c_part = np.where(use_sin_poly, _F32(0), c)
    sin = c_part + s_part
    cos = (c - c_part) + (s - s_part)
    return (sin.view(np.uint32) ^ sin_sign).view(_F32), (cos.view(np.uint32) ^ cos_sign).view(_F32)


_TWO_PI_F32 = _F32(2.0 * math.pi)


def _box_muller_16(u: np.ndarray) -> np.ndarray:
    """torch's normal_fill_16_AVX2 on rows of 16 uniforms (m, 16): Box & Muller (1958) pairs (j, j + 8)."""
    u1 = _F32(1) - u[:, :8]  # [0, 1) -> (0, 1] for the log
    radius = np.sqrt(_F32(-2) * _log_avx(u1))
    sin, cos = _sincos_avx(_TWO_PI_F32 * u[:, 8:])
    out = np.empty_like(u)
    # fmadd(n, std=1, mean=0): n * 1 is exact, and the + 0 turns -0.0 into +0.0 as the FMA does.
    out[:, :8] = radius * cos + _F32(0)
    out[:, 8:] = radius * sin + _F32(0)
    return out


class _TorchCpuSource:
    """torch's CPU generator (MT19937) and its float32 normal kernel, reproduced in numpy.

    torch.randn on the CPU (aten/src/ATen/native/cpu/DistributionTemplates.h, normal_kernel):
    for 16 or more elements it draws one 32-bit word per element, takes its low 24 bits as a uniform
    in [0, 1), and turns each block of 16 into normals with a vectorised Box-Muller; when the count is
    not a multiple of 16 it draws 16 more words and recomputes the last 16 values from them. Below 16
    elements it uses the scalar double-precision normal_distribution: 53-bit uniforms from pairs of
    words, one Box-Muller pair per two values, the second cached in the generator for the next
    scalar draw (the cache outlives calls and survives the block path, as in torch).
    """

    def __init__(self, seed: int) -> None:
        self._bits = np.random.MT19937(0)  # numpy's MT19937 is the reference algorithm; only the seeding differs
        self._bits.state = {"bit_generator": "MT19937", "state": {"key": _mt19937_key(seed), "pos": 624}}
        self._cached_normal: float | None = None

    def _words(self, n: int) -> np.ndarray:
        return self._bits.random_raw(n)  # uint64 array holding 32-bit words

    def _uniforms(self, n: int) -> np.ndarray:
        # uniform_real_distribution<float>: (word & (2**24 - 1)) * 2**-24, exact in float32.
        return (self._words(n) & 0xFFFFFF).astype(_F32) * _F32(2.0**-24)

    def _scalar_normal(self) -> float:
        """at::normal_distribution<double>, with its cached second value."""
        if self._cached_normal is not None:
            value, self._cached_normal = self._cached_normal, None
            return value
        w = [int(word) for word in self._words(4)]
        mask53 = (1 << 53) - 1
        u1 = (((w[0] << 32) | w[1]) & mask53) * 2.0**-53  # random64() is (first << 32) | second
        u2 = (((w[2] << 32) | w[3]) & mask53) * 2.0**-53
        radius = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        self._cached_normal = radius * math.sin(theta)
        return radius * math.cos(theta)

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        n = math.prod(shape)
        if n < 16:
            return np.array([self._scalar_normal() for _ in range(n)], dtype=_F32).reshape(shape)
        blocks = n // 16
        out = np.empty(n, dtype=_F32)
        u = self._uniforms(n)
        out[: blocks * 16] = _box_muller_16(u[: blocks * 16].reshape(blocks, 16)).reshape(-1)
        if n % 16:
            out[n - 16 :] = _box_muller_16(self._uniforms(16).reshape(1, 16)).reshape(-1)
        return out.reshape(shape)


# --- "nv": AUTOMATIC1111's Philox imitation of torch.randn on NVIDIA GPUs ------------------------------

# Philox 4x32 multipliers and Weyl key increments (Salmon, Moraes, Dror & Shaw 2011, "Parallel random
# numbers: as easy as 1, 2, 3").
_PHILOX_M0, _PHILOX_M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_PHILOX_ROUNDS = 10
# curand's 2**-32 and 2**-32 * 2pi as float32 constants, as A1111 writes them; its arithmetic is float64.
_INV_2POW32 = float(_F32(2.3283064e-10))
_INV_2POW32_2PI = float(_F32(2.3283064e-10 * 6.2831855))


def _philox4x32(counters: list[np.ndarray], key: tuple[int, int], rounds: int = _PHILOX_ROUNDS) -> list[np.ndarray]:
    """Philox 4x32 on uint64 arrays holding 32-bit words (Salmon et al. 2011)."""
    c0, c1, c2, c3 = counters
    k0, k1 = key
    u32 = np.uint64(_U32)
    shift = np.uint64(32)
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + _PHILOX_W0) & _U32, (k1 + _PHILOX_W1) & _U32
        p0, p1 = c0 * _PHILOX_M0, c2 * _PHILOX_M1  # exact: 32 x 32 bits fits in 64
        c0, c1, c2, c3 = (
            (p1 >> shift) ^ c1 ^ np.uint64(k0),
            p1 & u32,
            (p0 >> shift) ^ c3 ^ np.uint64(k1),
            p0 & u32,
        )
    return [c0, c1, c2, c3]


class _PhiloxSource:
    """AUTOMATIC1111's "NV" generator (modules/rng_philox.py), reproduced.

    Element i of call k (k = 0, 1, ...) is Philox 4x32-10 of the counter (k, 0, i, 0) under the key
    (seed mod 2**32, seed // 2**32); its first two words x, y give one Box-Muller value,
    sqrt(-2 ln u) sin(v) with u = (x + 1/2) 2**-32 and v = (y + 1/2) 2**-32 2pi, in float64 numpy
    arithmetic (the same numpy calls A1111 makes), then float32.
    """

    def __init__(self, seed: int) -> None:
        self._key = (seed & _U32, seed >> 32)
        self._offset = 0

    def randn(self, shape: tuple[int, ...]) -> np.ndarray:
        n = math.prod(shape)
        index = np.arange(n, dtype=np.uint64) & np.uint64(_U32)  # A1111 counts in uint32
        zeros = np.zeros(n, dtype=np.uint64)
        offset = np.full(n, self._offset & _U32, dtype=np.uint64)
        self._offset += 1
        x, y, _, _ = _philox4x32([offset, zeros, index, zeros], self._key)
        u = x.astype(np.float64) * _INV_2POW32 + _INV_2POW32 / 2
        v = y.astype(np.float64) * _INV_2POW32_2PI + _INV_2POW32_2PI / 2
        return (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(_F32).reshape(shape)


_SOURCES: dict[str, type] = {"cpu": _TorchCpuSource, "nv": _PhiloxSource, "numpy": _NumpySource}

SOURCES = tuple(_SOURCES)


def _shape(shape: int | Sequence[int]) -> tuple[int, ...]:
    return (int(shape),) if isinstance(shape, Integral) else tuple(int(dim) for dim in shape)


class NoiseGenerator:
    """A stateful stream of float32 standard normal noise: successive ``randn`` calls continue the stream."""

    def __init__(self, seed: int, source: str = DEFAULT_SOURCE) -> None:
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


def randn(shape: int | Sequence[int], seed: int, source: str = DEFAULT_SOURCE) -> np.ndarray:
    """Return a float32 standard normal array of ``shape``: the start of the stream for ``seed``."""
    return NoiseGenerator(seed, source).randn(shape)
