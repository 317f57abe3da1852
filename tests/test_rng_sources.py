"""sdlite.rng's "cpu" and "nv" noise sources against their references.

"cpu" must equal torch.randn on a seeded CPU generator bit for bit, call after call. "nv" must equal
a plain scalar Philox 4x32-10 + Box-Muller written here from the published algorithm (Salmon et al.
2011) and AUTOMATIC1111's rng_philox.py behaviour, and the values A1111 documents for seed 0.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from sdlite import rng

SEEDS = [0, 1, 2**32 - 1, 2**63 - 1, 2**64 - 1]
SHAPES = [(1,), (3,), (15,), (16,), (17,), (2, 3, 5), (1, 4, 8, 8), (1, 4, 9, 11), (2, 4, 64, 64)]


# Tests that take this fixture are torch-marked; tests/test_golden.py checks stored torch.randn values without torch.
@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


# --- cpu ---------------------------------------------------------------------------------------------


@pytest.mark.torch
@pytest.mark.parametrize("seed", SEEDS)
def test_cpu_stream_equals_torch(torch, seed):
    """Every shape drawn twice in a row from one generator, as diffusers draws latents then step noise."""
    ours = rng.NoiseGenerator(seed, "cpu")
    theirs = torch.Generator("cpu").manual_seed(seed)
    for shape in SHAPES:
        for draw in (1, 2):
            want = torch.randn(shape, generator=theirs, dtype=torch.float32).numpy()
            got = ours.randn(shape)
            assert got.dtype == np.float32 and got.shape == shape
            assert np.array_equal(got, want), f"seed {seed}, shape {shape}, draw {draw}"


@pytest.mark.torch
@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_first_draw_equals_torch(torch, shape):
    want = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(12345)).numpy()
    assert np.array_equal(rng.randn(shape, 12345, "cpu"), want)


@pytest.mark.torch
def test_cpu_scalar_cache_crosses_calls(torch):
    """Below 16 values torch caches the second Box-Muller value in the generator; the block path leaves it."""
    shapes = [(3,), (17,), (1,), (0,), (5,), (2, 4, 64, 64), (1,), (1,), (31,), (7,)]
    ours = rng.NoiseGenerator(7, "cpu")
    theirs = torch.Generator().manual_seed(7)
    for shape in shapes:
        assert np.array_equal(ours.randn(shape), torch.randn(shape, generator=theirs).numpy()), shape


@pytest.mark.torch
def test_cpu_many_values(torch):
    """Enough values to meet the rare roundings (FMA double-rounding fix-ups) the kernel emulation handles."""
    want = torch.randn(300_001, generator=torch.Generator().manual_seed(3)).numpy()
    assert np.array_equal(rng.randn(300_001, 3, "cpu"), want)


def test_cpu_seed_uses_low_32_bits():
    """torch's mt19937 keeps the low 32 bits of the seed."""
    assert np.array_equal(rng.randn(40, 5, "cpu"), rng.randn(40, 2**32 + 5, "cpu"))
    assert np.array_equal(rng.randn(40, 2**32 - 1, "cpu"), rng.randn(40, 2**64 - 1, "cpu"))


def test_fma_rounds_once():
    """a*b + c whose float64 sum lands halfway between two float32 values, rounding down and up."""
    a = np.array([1 + 2**-23], np.float32)
    b = np.float32(64 - 2**-17)  # a * b = 64 - 2**-40
    c = np.float32(2**30 + 2**7)
    assert rng._fma(a, b, c)[0] == np.float32(2**30 + 2**7)
    assert rng._fma(a, -b, -c)[0] == -np.float32(2**30 + 2**7)


# --- nv ----------------------------------------------------------------------------------------------

_M0, _M1, _W0, _W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
_MASK = 0xFFFFFFFF


def philox4x32_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    """Philox 4x32-10, one counter at a time in Python integers (Salmon et al. 2011, section 4)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_ in range(10):
        if round_:
            k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
        p0, p1 = _M0 * c0, _M1 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & _MASK, (p0 >> 32) ^ c3 ^ k1, p0 & _MASK
    return c0, c1, c2, c3


def nv_value(seed: int, call: int, index: int) -> np.float32:
    """A1111's NV value: Philox of counter (call, 0, index, 0) under the seed's two halves, then Box-Muller."""
    x, y, _, _ = philox4x32_10((call, 0, index, 0), (seed & _MASK, seed >> 32))
    inv = float(np.float32(2.3283064e-10))
    inv_2pi = float(np.float32(2.3283064e-10 * 6.2831855))
    u = x * inv + inv / 2
    v = y * inv_2pi + inv_2pi / 2
    return np.float32(math.sqrt(-2.0 * math.log(u)) * math.sin(v))


def test_philox_known_answers():
    """Random123's known-answer vectors for philox4x32_10 check the reference itself."""
    assert philox4x32_10((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert philox4x32_10((_MASK,) * 4, (_MASK, _MASK)) == (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)
    assert philox4x32_10((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0)) == (
        0xD16CFE09,
        0x94FDCCEB,
        0x5001E420,
        0x24126EA1,
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_nv_stream_equals_reference(seed):
    ours = rng.NoiseGenerator(seed, "nv")
    call = 0
    for shape in SHAPES:
        for _ in range(2):
            got = ours.randn(shape).ravel()
            n = got.size
            # Counter-based: any element can be checked alone, so big draws are sampled.
            indices = range(n) if n <= 512 else [*range(64), *range(64, n, 97), n - 1]
            want = np.array([nv_value(seed, call, i) for i in indices], dtype=np.float32)
            assert np.array_equal(got[list(indices)], want), f"seed {seed}, shape {shape}, call {call}"
            call += 1


def test_nv_a1111_documented_values():
    """The output rng_philox.py's docstring gives for Generator(seed=0).randn((3, 4)) (torch.randn on CUDA).

    Those digits are float64 Box-Muller with the exact 2**-32 * 2pi; the code (and so A1111's images)
    uses that constant rounded to float32 and returns float32, which moves values by a few float32 ulps.
    """
    want = [
        [-0.92466259, -0.42534415, -2.6438457, 0.14518388],
        [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
        [-1.07454231, -0.36314407, -1.67105067, 2.26550497],
    ]
    np.testing.assert_allclose(rng.randn((3, 4), 0, "nv"), want, rtol=0, atol=5e-7)


# --- registry ----------------------------------------------------------------------------------------


@pytest.mark.torch
def test_sources_and_default(torch):
    assert set(rng.SOURCES) == {"cpu", "nv", "numpy"}
    assert rng.DEFAULT_SOURCE == "cpu"
    want = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(42)).numpy()
    assert np.array_equal(rng.randn((1, 4, 8, 8), 42), want)
    assert np.array_equal(rng.NoiseGenerator(42).randn((1, 4, 8, 8)), want)


def test_unknown_source_lists_known():
    with pytest.raises(ValueError, match="unknown noise source 'cuda'; known sources: cpu, nv, numpy"):
        rng.NoiseGenerator(0, source="cuda")
