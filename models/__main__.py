"""``python -m sdlite.models RECIPE OUT``: build a model recipe as a diffusers folder.

``shapes`` is trained, not just built: ``python -m sdlite.models shapes --train OUT``.
"""

import argparse
import sys

TRAINED = ("shapes",)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and build (or train) the requested recipe."""
    from sdlite.models.recipes import PART_RECIPES, RECIPES

    parser = argparse.ArgumentParser(prog="python -m sdlite.models", description=__doc__)
    parser.add_argument("recipe", choices=sorted([*RECIPES, *PART_RECIPES, *TRAINED]))
    parser.add_argument("out", help="output diffusers folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", action="store_true", help="train the recipe (required for shapes)")
    parser.add_argument("--quick", action="store_true", help="shapes: a few steps only, to check the path")
    args = parser.parse_args(argv)
    if args.recipe in TRAINED and not args.train:
        print(f"error: {args.recipe} is a trained recipe: add --train (about 40 minutes on 2 cores)", file=sys.stderr)
        return 2
    if args.recipe not in TRAINED and (args.train or args.quick):
        print(f"error: {args.recipe} is built from random weights: drop --train/--quick", file=sys.stderr)
        return 2
    try:
        if args.recipe in TRAINED:
            from sdlite.models.shapes import ShapesConfig, train
        else:
            from sdlite.models.recipes import build
    except ImportError as exc:
        print(f"error: recipes need the convert extra (pip install 'sdlite[convert]'): {exc}", file=sys.stderr)
        return 2
    try:
        if args.recipe in TRAINED:
            cfg = ShapesConfig(vae_steps=20, unet_steps=20, latents_dataset=512) if args.quick else ShapesConfig()
            train(args.out, args.seed, cfg)
        else:
            build(args.recipe, args.out, args.seed)
    except (FileExistsError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
