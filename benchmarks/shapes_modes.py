"""img2img and inpainting judged on the shapes model.

    python -m sdlite.benchmarks.shapes_modes [-m MODEL] [--prompts 60]

- img2img at strength 0.3 from a ground-truth image in a corner, prompted with its caption without the
  position phrase: a light touch must keep the shape's colour and its corner (SDEdit keeps the composition
  at low strength), where txt2img from the same prompt puts the shape anywhere.
- img2img at strength 0.3 prompted with *another* shape colour: which one wins, the image or the prompt.
- inpainting the shape's box (grown by 4 px), prompted with another shape colour: the shape must take the
  prompt's colour while the background stays.
Each figure is the fraction of prompts the independent judge (sdlite.benchmarks.judge) scores correct.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys

import numpy as np
from PIL import Image, ImageFilter
from tqdm.auto import tqdm

from sdlite.benchmarks.judge import judge, position
from sdlite.models import default_model_path
from sdlite.models.shapes_data import COLOURS, PALETTE, POSITIONS, eval_prompts, render
from sdlite.pipeline import Pipeline


def _other_colour(attrs, rng: random.Random) -> str:
    return rng.choice([c for c in COLOURS if c not in (attrs.colour, attrs.background)])


def _shape_mask(image: Image.Image, background: str, grow: int = 4) -> Image.Image:
    """White where the ground-truth image is not the background colour, grown by ``grow`` pixels."""
    arr = np.asarray(image, dtype=np.int16)
    mask = (np.abs(arr - np.array(PALETTE[background])).sum(axis=2) > 0).astype(np.uint8) * 255
    return Image.fromarray(mask).filter(ImageFilter.MaxFilter(2 * grow + 1))


def evaluate(pipe: Pipeline, n: int, steps: int, seed: int, progress: bool = True) -> dict[str, float]:
    """Run both checks on ``n`` evaluation prompts; returns the fractions the judge scores correct."""
    rng = random.Random(seed)
    counts = dict.fromkeys(
        (
            "img2img keeps colour",
            "img2img keeps background",
            "img2img keeps the corner",
            "(txt2img, same prompt, lands in that corner)",
            "img2img with another colour prompted keeps the source's",
            "inpaint new colour",
            "inpaint keeps background",
        ),
        0,
    )
    corners = [p for p in POSITIONS if p != "center"]
    for i, attrs in enumerate(tqdm(eval_prompts(n), desc="shapes modes", disable=not progress)):
        cornered = dataclasses.replace(attrs, position=corners[i % len(corners)])
        prompt = cornered.caption(with_position=False)
        kept = pipe.img2img(prompt, render(cornered), strength=0.3, steps=steps, seed=seed + i, progress=False)[0]
        verdict = judge(kept)
        counts["img2img keeps colour"] += verdict.colour == attrs.colour
        counts["img2img keeps background"] += verdict.background == attrs.background
        counts["img2img keeps the corner"] += position(kept) == cornered.position
        fresh = pipe.txt2img(prompt, steps=steps, seed=seed + i, progress=False)[0]
        counts["(txt2img, same prompt, lands in that corner)"] += position(fresh) == cornered.position
        source = render(attrs)
        other = dataclasses.replace(attrs, colour=_other_colour(attrs, rng))
        recoloured = pipe.img2img(other.caption(), source, strength=0.3, steps=steps, seed=seed + i, progress=False)
        counts["img2img with another colour prompted keeps the source's"] += judge(recoloured[0]).colour == attrs.colour
        painted = judge(
            pipe.inpaint(
                other.caption(),
                source,
                _shape_mask(source, attrs.background),
                mask_blur=2,
                steps=steps,
                seed=seed + i,
                progress=False,
            )[0]
        )
        counts["inpaint new colour"] += painted.colour == other.colour
        counts["inpaint keeps background"] += painted.background == attrs.background
    return {key: value / n for key, value in counts.items()}


def main(argv: list[str] | None = None) -> int:
    """Print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-m", "--model", default=str(default_model_path()))
    parser.add_argument("--prompts", type=int, default=60)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    pipe = Pipeline.load(args.model)
    result = evaluate(pipe, args.prompts, args.steps, args.seed, progress=not args.quiet)
    print(f"shapes model, {args.prompts} prompts, {args.steps} steps, default sampler")
    print("| check | correct |")
    print("|---|---|")
    for key, value in result.items():
        print(f"| {key} | {value:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
