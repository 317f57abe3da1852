"""Score a shapes model against its prompts with the independent judge (:mod:`sdlite.benchmarks.judge`).

    python -m sdlite.benchmarks.shapes_eval [-m MODEL] [--prompts 200] [--samplers default|all|NAME,...]

Prints, first, the judge on ground-truth images (should be ~100%), then per sampler the fraction of
generated images whose shape colour, background colour and shape match the prompt, over all prompts and
separately over held-out colour pairs (never seen in training). Torch-free: runs on the runtime alone.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sdlite.benchmarks.judge import Verdict, judge, score
from sdlite.models.shapes_data import Attributes, eval_prompts, render


def _row(name: str, subset: str, n: int, s: dict[str, float], extra: str = "") -> str:
    return (
        f"| {name} | {subset} | {n} | {s['colour']:.1%} | {s['background']:.1%} | {s['shape']:.1%} | {s['all']:.1%} |"
        f"{extra}"
    )


HEADER = (
    "| sampler | prompts | n | shape colour | background | shape | all three |",
    "|---|---|---|---|---|---|---|",
)


def judge_ground_truth(prompts: list[Attributes], seed: int = 0) -> dict[str, float]:
    """The judge on images drawn by the data generator itself (its own error rate)."""
    rng = random.Random(seed)
    images = [render(a, (rng.randint(-3, 3), rng.randint(-3, 3))) for a in prompts]
    return score([judge(im) for im in images], prompts)


def generate(
    pipe, prompts: list[Attributes], sampler: str, steps: int, cfg: float, seed: int, chunk: int = 50
) -> list[Image.Image]:
    """One image per prompt (full caption), seed ``seed + i`` for prompt ``i``.

    The runtime's ``txt2img`` runs one prompt at a time, which for a model this small is mostly per-call
    overhead; this runs ``chunk`` different prompts per U-Net call with the runtime's own parts (text
    encoder, U-Net, sampler, per-image noise streams, VAE decoder) in ``txt2img``'s order, so it gives
    the same images (``check_batched`` compares the two).
    """
    from sdlite import schedulers
    from sdlite.images import to_pil
    from sdlite.rng import DEFAULT_SOURCE, NoiseGenerator

    images: list[Image.Image] = []
    unet = pipe.parts.get("unet")
    uncond = pipe.encode_prompt([""])
    for start in range(0, len(prompts), chunk):
        part = prompts[start : start + chunk]
        n = len(part)
        scheduler = schedulers.create(sampler, pipe.folder.scheduler_config)
        scheduler.set_timesteps(steps)
        streams = [NoiseGenerator(seed + start + i, DEFAULT_SOURCE) for i in range(n)]
        h, w = pipe.default_size[1] // 8, pipe.default_size[0] // 8

        def draw(streams=streams, h=h, w=w) -> np.ndarray:
            return np.concatenate([s.randn((1, 4, h, w)) for s in streams])

        cond = pipe.encode_prompt([a.caption() for a in part])
        context = np.concatenate([np.repeat(uncond, n, axis=0), cond]).astype(np.float32)
        latents = draw() * np.float32(scheduler.init_noise_sigma)
        for t in np.asarray(scheduler.timesteps):
            model_input = scheduler.scale_model_input(np.concatenate([latents] * 2), t)
            eps = unet.run(
                {
                    "sample": model_input.astype(np.float32),
                    "timestep": np.full((2 * n,), t, dtype=np.float32),
                    "encoder_hidden_states": context,
                }
            )["out_sample"]
            e_uncond, e_cond = np.split(eps, 2)
            eps = e_uncond + np.float32(cfg) * (e_cond - e_uncond)
            noise = draw() if scheduler.stochastic else None
            latents = scheduler.step(eps, t, latents, noise=noise).astype(np.float32)
        images.extend(to_pil(pipe.vae.decode(latents)))
    return images


def check_batched(pipe, prompts: list[Attributes], sampler: str, steps: int, cfg: float, seed: int) -> float:
    """Max |difference| (0..255) between :func:`generate` and the runtime's own ``txt2img``."""
    batched = generate(pipe, prompts, sampler, steps, cfg, seed)
    worst = 0.0
    for i, a in enumerate(prompts):
        single = pipe.txt2img(a.caption(), steps=steps, cfg_scale=cfg, sampler=sampler, seed=seed + i, progress=False)
        diff = np.abs(np.asarray(single[0], np.float32) - np.asarray(batched[i], np.float32)).max()
        worst = max(worst, float(diff))
    return worst


def evaluate(
    pipe, prompts: list[Attributes], sampler: str, steps: int, cfg: float, seed: int
) -> tuple[dict[str, dict[str, float]], list[Image.Image], list[Verdict]]:
    """Scores over all prompts, the held-out ones and the seen ones, plus the images and verdicts."""
    images = generate(pipe, prompts, sampler, steps, cfg, seed)
    verdicts = [judge(im) for im in images]
    held = [i for i, a in enumerate(prompts) if a.held_out]
    seen = [i for i, a in enumerate(prompts) if not a.held_out]
    scores = {
        "all": score(verdicts, prompts),
        "held-out": score([verdicts[i] for i in held], [prompts[i] for i in held]),
        "seen": score([verdicts[i] for i in seen], [prompts[i] for i in seen]),
    }
    return scores, images, verdicts


def contact_sheet(images: list[Image.Image], prompts: list[Attributes], verdicts: list[Verdict], path: Path) -> None:
    """Save the first 32 images with prompt and verdict, for looking at failures."""
    n = min(32, len(images))
    cols, cell = 8, 64
    sheet = Image.new("RGB", (cols * cell * 2, ((n + cols - 1) // cols) * (cell + 24)), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        x, y = (i % cols) * cell * 2, (i // cols) * (cell + 24)
        sheet.paste(images[i], (x, y))
        a, v = prompts[i], verdicts[i]
        draw.text((x + cell + 2, y + 2), f"{a.colour}\n{a.shape}\n{a.background}", fill="black")
        draw.text((x + 2, y + cell + 2), f"{v.colour} {v.shape}/{v.background}"[:20], fill="red")
    sheet.save(path)


GRID_PROMPTS: tuple[str, ...] = (
    "a red circle on a blue background",
    "a small green triangle on a yellow background, top left",
    "a large white square on a black background",
    "a purple circle on a green background",
    "a small orange square on a green background, bottom right",
    "a yellow triangle on a purple background",
    "a large blue circle on a white background, top right",
    "a black triangle on a red background",
    "a small red square on a yellow background, center",
    "a green circle on a purple background",
    "a white triangle on a blue background, bottom left",
    "a small blue square on a red background, top left",
)


def make_grid(pipe, path: Path, steps: int = 20, cfg: float = 7.5, seed: int = 1, cols: int = 4) -> None:
    """Save the README's grid: generated images (2x, nearest) with their prompts underneath.

    Uses ``txt2img`` itself, exactly what ``sdlite generate PROMPT --seed SEED`` gives."""
    cell_w, img_side, text_h = 150, 128, 30
    rows = (len(GRID_PROMPTS) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * cell_w, rows * (img_side + text_h + 6)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, prompt in enumerate(GRID_PROMPTS):
        image = pipe.txt2img(prompt, steps=steps, cfg_scale=cfg, seed=seed, progress=False)[0]
        x = (i % cols) * cell_w + (cell_w - img_side) // 2
        y = (i // cols) * (img_side + text_h + 6)
        sheet.paste(image.resize((img_side, img_side), Image.NEAREST), (x, y + 3))
        words, lines = prompt.split(), [""]
        for word in words:  # wrap to the cell width (Pillow's default font is ~6 px per character)
            if len(lines[-1]) + len(word) + 1 > cell_w // 6:
                lines.append("")
            lines[-1] = f"{lines[-1]} {word}".strip()
        draw.multiline_text(((i % cols) * cell_w + 3, y + img_side + 4), "\n".join(lines[:3]), fill="black", spacing=0)
    sheet.save(path, optimize=True)


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation and print the tables."""
    from sdlite import Pipeline, schedulers
    from sdlite.models import default_model_path

    parser = argparse.ArgumentParser(prog="python -m sdlite.benchmarks.shapes_eval", description=__doc__)
    parser.add_argument("-m", "--model", default=str(default_model_path()))
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--samplers", default="default", help="default | all | comma-separated names")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", help="also save the README grid (12 prompts with captions) here")
    parser.add_argument("--sheet", help="save a contact sheet of the default sampler's first images here")
    args = parser.parse_args(argv)

    prompts = eval_prompts(args.prompts)
    n_held = sum(a.held_out for a in prompts)
    gt = judge_ground_truth(prompts)
    print(
        f"judge on ground-truth images ({len(prompts)}): shape colour {gt['colour']:.1%}, "
        f"background {gt['background']:.1%}, shape {gt['shape']:.1%}"
    )

    pipe = Pipeline.load(args.model)
    default = pipe.default_sampler
    if args.samplers == "default":
        names = [default]
    elif args.samplers == "all":
        names = [default] + [s for s in schedulers.names() if s != default]
    else:
        names = [s.strip() for s in args.samplers.split(",")]
    diff = check_batched(pipe, prompts[:3], default, args.steps, args.cfg, args.seed)
    print(f"batched generation vs txt2img (3 prompts): max |diff| {diff:.0f}/255")
    print(
        f"model {args.model}; {len(prompts)} prompts ({n_held} held-out colour pairs); "
        f"{args.steps} steps, CFG {args.cfg}, seeds {args.seed}..{args.seed + len(prompts) - 1}"
    )
    print()
    if args.grid:
        make_grid(pipe, Path(args.grid), args.steps, args.cfg)
    print(*HEADER, sep="\n")
    for name in names:
        started = time.perf_counter()
        try:
            scores, images, verdicts = evaluate(pipe, prompts, name, args.steps, args.cfg, args.seed)
        except Exception as exc:  # one sampler failing must not hide the others' figures
            print(f"| {name} | error: {exc} | | | | | |")
            continue
        label = f"{name} (default)" if name == default else name
        secs = time.perf_counter() - started
        print(_row(label, "all", len(prompts), scores["all"]))
        print(_row(label, "held-out", n_held, scores["held-out"], f" <!-- {secs:.0f} s -->"))
        sys.stdout.flush()
        if args.sheet and name == default:
            contact_sheet(images, prompts, verdicts, Path(args.sheet))
    return 0


if __name__ == "__main__":
    sys.exit(main())
