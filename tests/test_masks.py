"""Masks, paste-back, outpainting, odd input sizes and bad input of the image modes, torch-free, on the
embedded default model (64x64). Parity of these modes with diffusers is in test_image_modes.py."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageFilter

from sdlite import Pipeline
from sdlite.models import default_model_path

PROMPT = "a red circle on a blue background"
SIZE = 64


def _image() -> Image.Image:
    rng = np.random.default_rng(3)
    base = np.zeros((SIZE, SIZE, 3), np.uint8)
    base[..., 2] = 200
    base[16:48, 16:48] = (220, 30, 30)
    return Image.fromarray(np.clip(base + rng.integers(0, 20, base.shape), 0, 255).astype(np.uint8))


def _mask() -> Image.Image:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:40, 24:56] = 255
    return Image.fromarray(mask)


@pytest.fixture(scope="module")
def ours():
    return Pipeline.load(default_model_path())


def test_pixels_outside_blurred_mask_are_the_input(ours):
    image = ours.inpaint(PROMPT, _image(), _mask(), mask_blur=4, steps=3, seed=1, progress=False)[0]
    blurred = np.asarray(_mask().filter(ImageFilter.GaussianBlur(4)))
    outside = blurred == 0
    assert outside.sum() > 1000
    assert np.array_equal(np.asarray(image)[outside], np.asarray(_image())[outside])
    assert not np.array_equal(np.asarray(image)[~outside], np.asarray(_image())[~outside])


def test_only_masked_keeps_the_rest(ours):
    image = ours.inpaint(
        PROMPT,
        _image(),
        _mask(),
        mask_blur=0,
        only_masked=True,
        padding=4,
        steps=3,
        seed=1,
        width=64,
        height=64,
        progress=False,
    )[0]
    assert image.size == (SIZE, SIZE)
    outside = np.asarray(_mask()) == 0
    assert np.array_equal(np.asarray(image)[outside], np.asarray(_image())[outside])
    assert "Inpaint area: Only masked" in image.info["parameters"]


def test_outpaint_grows_canvas_and_keeps_original(ours):
    extend = (16, 0, 32, 8)
    image = ours.outpaint(PROMPT, _image(), extend=extend, mask_blur=4, seam=8, steps=3, seed=1, progress=False)[0]
    assert image.size == (SIZE + 48, SIZE + 8)
    # Far enough from the seam (seam 8 + blur 4 -> 3 sigma is 12 px), the original is untouched.
    kept = np.asarray(image)[0 + 0 : SIZE - 8 - 12, 16 + 20 : 16 + SIZE - 8 - 12]
    assert np.array_equal(kept, np.asarray(_image())[: SIZE - 20, 20 : SIZE - 20])
    assert 'Outpaint: "16,0,32,8"' in image.info["parameters"]


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda p: p.img2img(PROMPT, _image(), strength=1.5), "strength"),
        (lambda p: p.img2img(PROMPT, _image(), strength=0.0), "strength"),
        (lambda p: p.inpaint(PROMPT, _image(), Image.new("L", (32, 32))), "same size"),
        (lambda p: p.inpaint(PROMPT, _image(), Image.new("L", (SIZE, SIZE))), "empty"),
        (lambda p: p.outpaint(PROMPT, _image(), extend=(4, 0, 0, 0)), "multiple of 8"),
        (lambda p: p.outpaint(PROMPT, _image(), extend=(0, 0, 0, 0)), "nothing to outpaint"),
        (lambda p: p.img2img(PROMPT, "/nonexistent.png"), "not found"),
    ],
)
def test_bad_input_is_a_clear_error(ours, call, fragment):
    from sdlite.errors import InputError

    with pytest.raises(InputError, match=fragment):
        call(ours)


def test_all_white_mask_repaints_everything(ours):
    """Documented behaviour: an all-white mask is a full repaint (like img2img at the given strength)."""
    image = ours.inpaint(PROMPT, _image(), Image.new("L", (SIZE, SIZE), 255), steps=2, seed=1, progress=False)[0]
    assert image.size == (SIZE, SIZE)


@pytest.mark.parametrize("mode", ["fit", "crop", "pad"])
def test_img2img_any_input_size(ours, mode):
    odd = _image().resize((70, 51))
    image = ours.img2img(PROMPT, odd, strength=0.5, resize=mode, steps=2, seed=1, progress=False)[0]
    assert image.width % 8 == 0 and image.height % 8 == 0
