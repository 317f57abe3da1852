"""The invisible watermark: read back by the invisible-watermark package's own decoder, and sdlite's copy of
the package's encoder equal to it bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdlite.cli import main
from sdlite.watermark import SD_WATERMARK, encode_watermark, read_watermark


def _natural(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth, photo-like RGB image: gradients, soft blobs and a little sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    image = np.stack([np.sin(6 * x + 1) * 0.5 + 0.5, np.cos(5 * x * y + 2) * 0.5 + 0.5, (x + y) / 2], axis=-1)
    for _ in range(6):
        cy, cx, r = rng.uniform(0, 1, 3)
        blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (0.02 + 0.05 * r))
        image += blob[..., None] * rng.uniform(-0.4, 0.4, 3)
    image += rng.normal(0, 0.02, image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


# The invisible-watermark package, the reference, requires torch: the tests that call it are torch-marked.
def _package_decode(rgb: np.ndarray) -> bytes:
    from imwatermark import WatermarkDecoder

    return WatermarkDecoder("bytes", 8 * len(SD_WATERMARK)).decode(np.ascontiguousarray(rgb[:, :, ::-1]), "dwtDct")


def _package_encode(rgb: np.ndarray) -> np.ndarray:
    """What the original SD scripts did: RGB -> BGR, encode 'dwtDct', back to RGB."""
    from imwatermark import WatermarkEncoder

    encoder = WatermarkEncoder()
    encoder.set_watermark("bytes", SD_WATERMARK)
    return encoder.encode(np.ascontiguousarray(rgb[:, :, ::-1]), "dwtDct")[:, :, ::-1]


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255**2 / np.mean((a.astype(np.float64) - b) ** 2)))


@pytest.mark.torch
@pytest.mark.parametrize(
    "image",
    [
        _natural(512, 512),
        _natural(261, 397, seed=1),  # sides that are not multiples of 4: the package marks the top-left crop
        (np.random.default_rng(2).integers(0, 2, (384, 256, 3)) * 255).astype(np.uint8),  # saturated colours
    ],
    ids=["natural-512", "odd-261x397", "saturated"],
)
def test_dwtdct_method_equals_the_package_encoder(image):
    """Tolerance 0: the same colour conversion, wavelet arithmetic and truncation, bit for bit."""
    ours = encode_watermark(image, method="dwtDct")
    assert np.array_equal(ours, _package_encode(image))


@pytest.mark.torch
@pytest.mark.parametrize("shape", [(512, 512), (256, 256), (256, 384)])
def test_robust_mark_is_read_by_the_package_decoder(shape):
    image = _natural(*shape)
    marked = encode_watermark(image)
    assert _package_decode(marked) == SD_WATERMARK
    # sdlite's reader is the package's decoder in numpy.
    assert read_watermark(marked) == SD_WATERMARK
    # Invisible: measured 40.5-40.7 dB on these images, against 36.2-36.3 dB for the package's own encoder.
    assert _psnr(marked, image) > 38.0
    # On smooth images the package's encoder lowers marked coefficients below their neighbours and its own
    # decoder then reads the wrong ones: the reason sdlite's default method exists.
    package_marked = _package_encode(image)
    assert _package_decode(package_marked) != SD_WATERMARK
    assert read_watermark(package_marked) == _package_decode(package_marked)


@pytest.mark.torch
def test_unmarked_image_does_not_read_as_marked():
    assert _package_decode(_natural(256, 256)) != SD_WATERMARK


def _generate(model, out, *extra: str) -> list[str]:
    return [
        "generate",
        "a red circle",
        "-m",
        str(model),
        "-o",
        str(out),
        "--steps",
        "2",
        "--seed",
        "3",
        "--quiet",
        *extra,
    ]


def test_generate_with_watermark(tiny_onnx, tmp_path):
    """The smallest size the decoder reads (256x256) from the command line, and img2img from Python."""
    marked, plain = tmp_path / "marked.png", tmp_path / "plain.png"
    assert main(_generate(tiny_onnx, marked, "--size", "256x256", "--watermark")) == 0
    assert main(_generate(tiny_onnx, plain, "--size", "256x256")) == 0
    marked_rgb, plain_rgb = np.asarray(Image.open(marked)), np.asarray(Image.open(plain))
    assert _package_decode(marked_rgb) == SD_WATERMARK
    assert _package_decode(plain_rgb) != SD_WATERMARK
    assert _psnr(marked_rgb, plain_rgb) > 35.0
    # The infotext is the unmarked image's: A1111 writes nothing about watermarks.
    assert Image.open(marked).info["parameters"] == Image.open(plain).info["parameters"]

    from sdlite import Pipeline

    pipe = Pipeline.load(tiny_onnx)
    images = pipe.img2img("a blue square", Image.open(plain), strength=0.5, steps=2, seed=1, watermark=True)
    assert _package_decode(np.asarray(images[0])) == SD_WATERMARK
    floats = pipe.txt2img("x", steps=2, seed=1, width=256, height=256, watermark=True, output_type="np", progress=False)
    assert _package_decode((floats[0] * 255).round().astype(np.uint8)) == SD_WATERMARK


def test_watermark_on_too_small_an_image_is_refused(tiny_onnx, tmp_path, capsys):
    out = tmp_path / "o.png"
    assert main(_generate(tiny_onnx, out, "--size", "64x64", "--watermark")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --watermark: a 64x64 image is too small") and "256x256" in err and "\n" not in err
    assert not out.exists()
