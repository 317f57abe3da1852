"""``python -m sdlite.models RECIPE OUT``: build a model recipe as a diffusers folder."""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and build the requested recipe."""
    from sdlite.models.recipes import RECIPES

    parser = argparse.ArgumentParser(prog="python -m sdlite.models", description=__doc__)
    parser.add_argument("recipe", choices=sorted(RECIPES))
    parser.add_argument("out", help="output diffusers folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        from sdlite.models.recipes import build
    except ImportError as exc:
        print(f"error: recipes need the convert extra (pip install 'sdlite[convert]'): {exc}", file=sys.stderr)
        return 2
    build(args.recipe, args.out, args.seed)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
