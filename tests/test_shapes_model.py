"""The shapes model: its data, the judge, and the trained model shipped as the embedded default."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest

from sdlite.benchmarks.judge import judge, position, score
from sdlite.models import default_model_path
from sdlite.models.shapes_data import HELD_OUT_PAIRS, Attributes, eval_prompts, render, samples

SHIPPED_LIMIT_BYTES = 25 * 1024 * 1024


def test_data_is_deterministic_and_never_shows_held_out_pairs():
    a = [next(s) for s in [samples(3)] for _ in range(50)]
    b = [next(s) for s in [samples(3)] for _ in range(50)]
    assert [x[1] for x in a] == [x[1] for x in b]
    assert all(np.array_equal(np.asarray(x[0]), np.asarray(y[0])) for x, y in zip(a, b, strict=True))
    stream = samples(0)
    assert not any(next(stream)[2].held_out for _ in range(2000))
    assert len(HELD_OUT_PAIRS) >= 6


def test_caption_is_plain_english():
    attrs = Attributes("triangle", "green", "yellow", "small", "top left")
    assert attrs.caption() == "a small green triangle on a yellow background, top left"
    assert attrs.caption(with_size=False, with_position=False) == "a green triangle on a yellow background"
    orange = Attributes("circle", "orange", "orange")
    assert orange.caption(with_size=False, with_position=False) == "an orange circle on an orange background"
    assert orange.caption(with_position=False) == "a large orange circle on an orange background"


def test_judge_is_exact_on_ground_truth():
    prompts = eval_prompts(150, seed=5)
    rng = random.Random(0)
    images = [render(a, (rng.randint(-3, 3), rng.randint(-3, 3))) for a in prompts]
    verdicts = [judge(image) for image in images]
    assert score(verdicts, prompts) == {"colour": 1.0, "background": 1.0, "shape": 1.0, "all": 1.0}
    assert [position(image) for image in images] == [a.position for a in prompts]


def test_judge_sees_no_shape_on_a_flat_image():
    flat = np.full((64, 64, 3), (40, 70, 230), dtype=np.uint8)
    verdict = judge(flat)
    assert (verdict.shape, verdict.background) == ("none", "blue")


def test_shipped_model_is_the_trained_shapes_model():
    folder = default_model_path()
    manifest = json.loads((folder / "sdlite.json").read_text())
    assert manifest["name"] == "shapes"
    assert manifest["default_size"] == [64, 64]
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert total < SHIPPED_LIMIT_BYTES


@pytest.fixture(scope="module")
def shipped():
    from sdlite import Pipeline

    return Pipeline.load(default_model_path())


@pytest.mark.parametrize(
    ("prompt", "seed", "expected"),
    [
        ("a red circle on a blue background", 0, ("circle", "red", "blue")),
        ("a small green triangle on a yellow background, top left", 0, ("triangle", "green", "yellow")),
        # black on white is a held-out colour pair: never seen in training.
        ("a black square on a white background", 0, ("square", "black", "white")),
    ],
)
def test_shipped_model_follows_the_prompt(shipped, prompt, seed, expected):
    image = shipped.txt2img(prompt, steps=20, seed=seed, progress=False)[0]
    assert image.size == (64, 64)
    verdict = judge(image)
    assert (verdict.shape, verdict.colour, verdict.background) == expected


def test_generation_with_the_shipped_model_is_torch_free():
    code = (
        "import sys; from sdlite import Pipeline; from sdlite.models import default_model_path;"
        "Pipeline.load(default_model_path()).txt2img('a red circle on a blue background', steps=4, seed=1,"
        " progress=False); assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_trained_recipe_needs_train_flag(tmp_path):
    from sdlite.models.__main__ import main

    assert main(["shapes", str(tmp_path / "out")]) == 2
