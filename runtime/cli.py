"""The ``sdlite`` command line. Every user mistake ends in one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

from sdlite.errors import InputError, SdliteError, SdliteWarning, summarize
from sdlite.layout import MODEL_INDEX


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are one line (argparse prints the whole usage block)."""

    def error(self, message: str):
        raise InputError(f"{self.prog}: {message}")


def parse_size(text: str) -> tuple[int, int]:
    """``WxH`` -> (W, H), both positive multiples of 8."""
    from sdlite.request import check_size

    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise InputError(f"--size {text}: expected WIDTHxHEIGHT, e.g. 512x512") from None
    try:
        check_size(width, height)
    except InputError as exc:
        raise InputError(f"--size {text}: {str(exc).partition(': ')[2]}") from None
    return width, height


def _default_model() -> Path:
    from sdlite.models import default_model_path

    path = default_model_path()
    if not (path / MODEL_INDEX).is_file():
        raise InputError("no model given and no default model is packaged; pass -m MODEL_FOLDER")
    return path


def _output_paths(out: str | None, seed: int, batch: int) -> list[Path]:
    from sdlite.images import check_output_path

    base = check_output_path(out or f"sdlite-{seed}.png")
    if batch == 1:
        return [base]
    return [base.with_name(f"{base.stem}-{i}{base.suffix}") for i in range(batch)]


def _load_options(args: argparse.Namespace) -> dict:
    """``Pipeline.load``'s keywords from the engine and memory flags (see :func:`_add_engine_arguments`)."""
    return dict(
        engine=args.engine,
        device=args.device,
        precision=args.precision,
        low_memory=args.low_memory,
        memory_budget=args.memory_budget,
        compute=args.compute,
        safety_checker=not args.no_safety_checker,
        embeddings=args.embeddings,
        vae=args.vae,
        lora_dir=args.lora_dir,
        refiner=getattr(args, "refiner", None),
    )


def _load_pipeline(args: argparse.Namespace):
    from sdlite.pipeline import Pipeline

    return Pipeline.load(args.model or _default_model(), vae_tiling=args.vae_tiling, **_load_options(args))


def _mode_call(args: argparse.Namespace, pipe, common: dict):
    """Call the pipeline method of the subcommand with its own arguments."""
    from sdlite.images import load_image

    if args.command == "generate":
        return pipe.txt2img(args.prompt, **common)
    image = load_image(args.image)
    if args.command == "img2img":
        return pipe.img2img(args.prompt, image, strength=args.strength, resize=args.resize, **common)
    if args.command == "inpaint":
        return pipe.inpaint(
            args.prompt,
            image,
            load_image(args.mask),
            strength=args.strength,
            mask_blur=args.mask_blur,
            only_masked=args.only_masked,
            padding=args.padding,
            resize=args.resize,
            **common,
        )
    common.pop("width"), common.pop("height")
    return pipe.outpaint(args.prompt, image, extend=args.extend, mask_blur=args.mask_blur, **common)


def _check_preview_every(args: argparse.Namespace) -> None:
    if args.preview_every < 0:
        raise InputError(f"--preview-every {args.preview_every}: must be 0 (no previews) or more")


def cmd_generate(args: argparse.Namespace) -> int:
    """Run one generation mode (generate, img2img, inpaint, outpaint) and save PNGs with their infotext."""
    from sdlite.images import save_png
    from sdlite.request import chosen_seed

    seed = chosen_seed(args.seed)
    outputs = _output_paths(args.output, seed, args.batch)  # fail before loading anything
    if args.steps is not None and args.steps < 1:
        raise InputError(f"--steps {args.steps}: must be at least 1")
    _check_preview_every(args)
    for name in ("image", "mask"):
        if getattr(args, name, None) and not Path(getattr(args, name)).is_file():
            raise InputError(f"--{name} {getattr(args, name)}: file not found")
    width, height = args.size or (None, None)
    pipe = _load_pipeline(args)
    common = dict(
        negative_prompt=args.negative,
        steps=args.steps,
        cfg_scale=args.cfg,
        sampler=args.sampler,
        seed=seed,
        width=width,
        height=height,
        batch=args.batch,
        seed_source=args.seed_source,
        schedule=args.schedule,
        clip_skip=args.clip_skip,
        watermark=args.watermark,
        cfg_rescale=args.cfg_rescale,
        progress=not args.quiet,
    )
    if args.refiner_switch is not None:
        common["refiner_switch"] = args.refiner_switch
    if args.preview_every:
        common["callback"] = _preview_writer(pipe, outputs[0], args.preview_every, args.quiet)
    images = _mode_call(args, pipe, common)
    if args.verbose and pipe.loras.updates:
        updates = ", ".join(f"{part} {seconds:.2f} s" for part, seconds in pipe.loras.updates.items())
        print(f"LoRA graph update (load, edit, first run): {updates}", file=sys.stderr)
    for image, path in zip(images, outputs, strict=True):
        save_png(image, path)
        if not args.quiet:
            print(path)
    flags = getattr(images, "nsfw_content_detected", None)  # None when no safety checker ran
    flagged = [str(path) for path, flag in zip(outputs, flags, strict=True) if flag] if flags else []
    if flagged:
        # Reported even with --quiet: the user would otherwise find black images and no reason.
        print(
            f"warning: the model's safety checker flagged {len(flagged)} of {len(outputs)} image(s) "
            f"({', '.join(flagged)}); they were saved black (--no-safety-checker turns the check off)",
            file=sys.stderr,
        )
    return 0


def _preview_writer(pipe, output: Path, every: int, quiet: bool):
    """A step callback that writes the first image's preview to ``<output stem>.preview.png`` every ``every``
    model evaluations (replacing the file atomically, so a viewer never reads half of it)."""
    from sdlite.images import save_png

    path = output.with_name(f"{output.stem}.preview.png")
    announced = quiet

    def write(step: int, total: int, latents, denoised) -> None:
        nonlocal announced
        if (step + 1) % every and step + 1 != total:
            return
        save_png(pipe.preview(denoised[:1])[0], path)
        if not announced:
            print(f"previews: {path}", file=sys.stderr)
            announced = True

    return write


def _converter(command: str):
    """The converter module, or a one-line error naming the extra ``sdlite COMMAND`` needs."""
    try:
        from sdlite.convert import converter
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("sdlite"):
            raise
        raise InputError(
            f"sdlite {command} needs the convert extra: pip install 'sdlite[convert]' ({exc.name} is missing)"
        ) from None
    return converter


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert a checkpoint into a converted-model folder."""
    converter = _converter("convert")
    if args.size:
        raise InputError("--size is not supported yet by this version of sdlite convert")

    formats = ["onnx", "openvino"] if args.format == "both" else args.format.split(",")
    converter.convert(
        args.source,
        args.out,
        formats=formats,
        precisions=args.precision.split(","),
        attention=args.attention,
        validate=not args.no_validate,
        allow_pickle=args.allow_pickle,
        quiet=args.quiet,
        loras=[converter.LoraSpec.parse(text) for text in args.lora],
        token_merging=args.token_merging,
        memory_budget_gb=args.memory_budget,
        resume=args.resume,
        verbose=args.verbose,
        tiny_vae=args.tiny_vae,
        preset=args.preset,
    )
    if not args.quiet:
        print(f"wrote {args.out}")
    return 0


def cmd_add_tiny_vae(args: argparse.Namespace) -> int:
    """Convert a tiny VAE into an existing converted-model folder."""
    _converter("add-tiny-vae").add_tiny_vae(
        args.model, args.tiny_vae, validate=not args.no_validate, quiet=args.quiet, overwrite=args.overwrite
    )
    if not args.quiet:
        print(f"added {args.tiny_vae} to {args.model}")
    return 0


def cmd_samplers(args: argparse.Namespace) -> int:
    """List the sampler names and schedules sdlite accepts."""
    from sdlite import schedulers

    print("samplers:  " + ", ".join(schedulers.names()))
    print("schedules: " + ", ".join(schedulers.schedules()))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Print what a converted-model folder holds."""
    from sdlite.model_folder import ModelFolder

    folder = ModelFolder.open(args.model)
    manifest = folder.manifest
    if args.verify:
        print(f"verified   {folder.verify()} files against the sha256 in the manifest")
    print(f"model      {manifest.name} ({manifest.family}, {manifest.prediction_type} prediction)")
    print(f"folder     {folder.path}")
    print(f"size       {manifest.default_size[0]}x{manifest.default_size[1]} (default)")
    print(f"vae scale  {manifest.vae_scaling_factor:g}")
    print(f"hash       {manifest.source_sha256[:10] if manifest.source_sha256 else 'unknown'}")
    if manifest.defaults:
        given = ", ".join(f"{key} {value}" for key, value in manifest.defaults.items())
        print(f"defaults   {given} ({manifest.preset or 'given'})")
    if manifest.tiny_vae:
        print(f"tiny vae   {manifest.tiny_vae} (--vae taesd; previews)")
    for component, variants in manifest.components.items():
        for variant in variants:
            size = sum((folder.path / f).stat().st_size for f in variant.files if (folder.path / f).is_file())
            check = ""
            diffs = (variant.validation or {}).get("max_abs_diff")
            if isinstance(diffs, dict) and diffs:
                worst = max(diffs.values())
                check = f"  max|diff| vs PyTorch {worst:.1e} {'ok' if variant.validation.get('passed') else 'FAILED'}"
            tome = f"  token merging {variant.token_merging:g}" if variant.token_merging else ""
            kept = f"  (kept {variant.kept}: overflows in {variant.precision})" if variant.kept else ""
            print(
                f"{component:<15}{variant.format:<9}{variant.precision:<6}{variant.attention:<7}"
                f"{size / 2**20:9.1f} MiB{check}{tome}{kept}"
            )
    return 0


def parse_extend(text: str) -> tuple[int, int, int, int]:
    """``L,T,R,B`` -> four ints (checked further by the outpainting itself)."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise InputError(f"--extend {text}: expected LEFT,TOP,RIGHT,BOTTOM pixels, e.g. 0,0,256,0") from None
    if len(values) != 4:
        raise InputError(f"--extend {text}: expected four numbers LEFT,TOP,RIGHT,BOTTOM")
    return values


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that say how a model is loaded (read back by :func:`_load_options`)."""
    from sdlite.engines import COMPUTE_PRECISIONS, ENGINES
    from sdlite.vae import VAE_CHOICES

    parser.add_argument(
        "--embeddings",
        metavar="DIR",
        help="folder of textual-inversion embeddings (.safetensors) that the prompt can use by name",
    )
    parser.add_argument(
        "--lora-dir",
        metavar="DIR",
        help="folder of LoRA files (.safetensors) that the prompt uses as <lora:name:multiplier>",
    )
    parser.add_argument("--engine", default="onnx", choices=ENGINES, help="onnx (onnxruntime) or openvino")
    parser.add_argument("--device", default="CPU", help="CPU, GPU, NPU or AUTO (what the engine sees here)")
    parser.add_argument("--compute", default="auto", choices=COMPUTE_PRECISIONS, help="arithmetic precision")
    parser.add_argument("--precision", help="weight precision variant to run (default: the first held)")
    parser.add_argument("--low-memory", action="store_true", help="load one part at a time (a memory budget of 0)")
    parser.add_argument(
        "--memory-budget",
        type=float,
        metavar="GIB",
        help="keep loaded parts within this many GiB, releasing idle ones, smallest first (default: keep all)",
    )
    parser.add_argument(
        "--no-safety-checker",
        action="store_true",
        help="do not run the model's safety checker (by default flagged images are saved black)",
    )
    parser.add_argument(
        "--vae",
        default="full",
        choices=VAE_CHOICES,
        help="taesd: decode with the tiny VAE converted beside the model (--tiny-vae): much faster, a little softer",
    )


def _add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    from sdlite.rng import SOURCES
    from sdlite.vae import TILING_MODES

    parser.add_argument("prompt")
    parser.add_argument("-m", "--model", help="converted-model folder (default: the packaged model)")
    parser.add_argument("-n", "--negative", default="", help="negative prompt")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's, else 20)")
    parser.add_argument(
        "--cfg", type=float, help="classifier-free guidance scale (default: the model's, else 7.5; 1 or less: off)"
    )
    parser.add_argument(
        "--cfg-rescale",
        type=float,
        default=0.0,
        metavar="PHI",
        help="rescale guidance towards the conditional prediction (0-1; 0.7 for zero-terminal-SNR models)",
    )
    parser.add_argument(
        "--sampler", help="A1111 sampler name (default: the model's own scheduler); see `sdlite samplers`"
    )
    parser.add_argument("--schedule", help="sigma schedule: automatic, karras, exponential, beta, sgm_uniform")
    parser.add_argument("--seed", type=int, default=-1, help="-1 picks a random seed")
    parser.add_argument(
        "--clip-skip", type=int, default=1, metavar="N", help="condition on the text encoder's N-th last layer"
    )
    parser.add_argument(
        "--seed-source",
        default="cpu",
        choices=SOURCES,
        help="cpu (torch CPU / diffusers / A1111 'CPU'), nv (A1111 'NV') or numpy",
    )
    parser.add_argument("--size", type=parse_size, help="WIDTHxHEIGHT, multiples of 8 (default: the model's)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--refiner", metavar="FOLDER", help="converted SDXL refiner that finishes the denoising")
    parser.add_argument(
        "--refiner-switch",
        type=float,
        metavar="F",
        help="fraction of the denoising after which the refiner takes over (default 0.8, as A1111's)",
    )
    _add_engine_arguments(parser)
    parser.add_argument("--vae-tiling", default="auto", choices=TILING_MODES, help="decode big images in tiles")
    parser.add_argument(
        "--watermark",
        action="store_true",
        help="invisible 'StableDiffusionV1' mark that invisible-watermark's dwtDct decoder reads (images >= 256x256)",
    )
    parser.add_argument("-o", "--output", help="output PNG (default: sdlite-SEED.png)")
    parser.add_argument(
        "--preview-every",
        type=int,
        default=0,
        metavar="N",
        help="write OUTPUT.preview.png every N steps (with the tiny VAE when the model has one)",
    )
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--verbose", action="store_true", help="print how long each LoRA graph update took")
    parser.set_defaults(func=cmd_generate)


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the HTTP server until interrupted."""
    from sdlite.server import serve
    from sdlite.server.generation import Limits

    if not 0 <= args.port <= 65535:
        raise InputError(f"--port {args.port}: must be from 0 to 65535")
    for name in ("max_queue", "max_images", "max_side"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} {getattr(args, name)}: must be at least 1")
    _check_preview_every(args)
    models = [Path(m) for m in args.model or []]
    if not models and args.models is None:
        models = [_default_model()]
    serve(
        models,
        Path(args.models) if args.models else None,
        host=args.host,
        port=args.port,
        load_options=_load_options(args),
        quiet=args.quiet,
        token=args.token or os.environ.get("SDLITE_TOKEN") or None,
        limits=Limits(max_side=args.max_side, max_images=args.max_images),
        max_queue=args.max_queue,
        preview_every=args.preview_every,
        outdir=Path(args.outdir),
    )
    return 0


def _add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-m", "--model", action="append", help="converted-model folder; repeat for several (default: the packaged one)"
    )
    parser.add_argument("--models", metavar="DIR", help="also offer every converted-model folder in DIR")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument(
        "--token", help="require this token (Bearer, or Basic user:password as A1111's --api-auth); or SDLITE_TOKEN"
    )
    _add_engine_arguments(parser)
    parser.add_argument("--max-queue", type=int, default=64, help="jobs that may wait; more get HTTP 503")
    parser.add_argument("--max-images", type=int, default=16, help="images one request may ask for")
    parser.add_argument("--max-side", type=int, default=2048, help="largest width or height a request may ask for")
    parser.add_argument(
        "--preview-every", type=int, default=5, metavar="N", help="render a progress preview every N steps (0: none)"
    )
    parser.add_argument("--outdir", default="outputs", help="where images go when a request asks to save them")
    parser.add_argument("--quiet", action="store_true", help="log only warnings")
    parser.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from sdlite import __version__

    parser = _Parser(prog="sdlite", description="Convert Stable Diffusion checkpoints once, then run them offline.")
    parser.add_argument("--version", action="version", version=f"sdlite {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="text to image")
    _add_generation_arguments(gen)

    i2i = sub.add_parser("img2img", help="repaint an image towards a prompt")
    _add_generation_arguments(i2i)
    i2i.add_argument("--image", required=True, help="input image")
    i2i.add_argument("--strength", type=float, default=0.75, help="how much to change, (0, 1]")
    i2i.add_argument("--resize", default="fit", help="fit | crop | pad: how to reach multiples of 8")

    inp = sub.add_parser("inpaint", help="repaint the white part of a mask")
    _add_generation_arguments(inp)
    inp.add_argument("--image", required=True, help="input image")
    inp.add_argument("--mask", required=True, help="mask image, white = repaint, same size as the image")
    inp.add_argument("--strength", type=float, default=1.0)
    inp.add_argument("--mask-blur", type=int, default=4, help="feather the mask by this many pixels")
    inp.add_argument("--only-masked", action="store_true", help="inpaint the mask's box at full resolution")
    inp.add_argument("--padding", type=int, default=32, help="pixels around the mask's box with --only-masked")
    inp.add_argument("--resize", default="fit", help="fit | crop | pad: how to reach multiples of 8")

    out = sub.add_parser("outpaint", help="grow the canvas and paint the new area")
    _add_generation_arguments(out)
    out.add_argument("--image", required=True, help="input image (sides multiples of 8)")
    out.add_argument("--extend", type=parse_extend, required=True, help="LEFT,TOP,RIGHT,BOTTOM pixels")
    out.add_argument("--mask-blur", type=int, default=8)

    srv = sub.add_parser("serve", help="HTTP server: A1111 and OpenAI APIs and a web page (needs sdlite[serve])")
    _add_serve_arguments(srv)

    conv = sub.add_parser("convert", help="export a checkpoint to a converted-model folder (needs sdlite[convert])")
    conv.add_argument("source", help="diffusers folder, .safetensors file or hub id")
    conv.add_argument("out", help="output folder (must not exist)")
    conv.add_argument("--format", default="onnx", help="onnx, openvino or both")
    conv.add_argument("--precision", default="fp32", help="comma-separated: fp32, fp16, int8, w8a8 (OpenVINO)")
    conv.add_argument("--attention", default="plain", help="plain, sliced (one head at a time) or fused")
    conv.add_argument(
        "--token-merging",
        type=float,
        default=0.0,
        metavar="RATIO",
        help="merge this fraction of tokens (0-0.75) in the U-Net's full-resolution self-attention (ToMe): faster, "
        "changes the image",
    )
    conv.add_argument("--size", type=parse_size)
    conv.add_argument(
        "--lora", action="append", default=[], metavar="FILE[:WEIGHT]", help="fuse a LoRA (repeatable; weight 1)"
    )
    conv.add_argument(
        "--tiny-vae",
        metavar="PATH_OR_ID",
        help="also convert this tiny autoencoder (TAESD: an AutoencoderTiny folder or hub id) for --vae taesd and "
        "previews",
    )
    conv.add_argument(
        "--preset",
        default="auto",
        help="few-step family whose defaults (steps, CFG, sampler) the model gets: auto (detect), none, lcm, turbo, "
        "lightning",
    )
    conv.add_argument(
        "--memory-budget",
        type=float,
        metavar="GB",
        help="refuse up front a conversion whose largest step needs more (default: the memory free now)",
    )
    conv.add_argument(
        "--resume", action="store_true", help="continue an interrupted conversion into OUT from its finished steps"
    )
    conv.add_argument("--verbose", action="store_true", help="print every phase's seconds and peak memory")
    conv.add_argument("--allow-pickle", action="store_true", help="load a pickled .ckpt you trust")
    conv.add_argument("--no-validate", action="store_true")
    conv.add_argument("--quiet", action="store_true")
    conv.set_defaults(func=cmd_convert)

    tiny = sub.add_parser(
        "add-tiny-vae",
        help="convert a tiny autoencoder (TAESD) into a converted-model folder, for --vae taesd and previews "
        "(needs sdlite[convert])",
    )
    tiny.add_argument("model", help="converted-model folder")
    tiny.add_argument("tiny_vae", metavar="PATH_OR_ID", help="an AutoencoderTiny folder or hub id (TAESD, TAESDXL)")
    tiny.add_argument("--overwrite", action="store_true", help="replace the tiny VAE the folder has")
    tiny.add_argument("--no-validate", action="store_true")
    tiny.add_argument("--quiet", action="store_true")
    tiny.set_defaults(func=cmd_add_tiny_vae)

    sub.add_parser("samplers", help="list sampler and schedule names").set_defaults(func=cmd_samplers)

    info = sub.add_parser("info", help="what a converted-model folder holds")
    info.add_argument("model")
    info.add_argument("--verify", action="store_true", help="check every file against its recorded sha256")
    info.set_defaults(func=cmd_info)

    sub.add_parser("bench", help="latency, memory and fidelity per configuration (sdlite bench --help)", add_help=False)
    return parser


def cmd_bench(argv: list[str]) -> int:
    """``sdlite bench ...``: handed to the benchmark harness, which parses its own arguments."""
    try:
        from sdlite.benchmarks.cli import main as bench_main
    except ImportError as exc:
        raise InputError(f"sdlite bench could not start ({exc}); install sdlite with its bench extra") from None
    return bench_main(argv)


# Library errors name parameters; the CLI user knows them by these flags.
_FLAGS = {
    "cfg_scale": "--cfg",
    "cfg_rescale": "--cfg-rescale",
    "negative_prompt": "--negative",
    "steps": "--steps",
    "seed": "--seed",
    "batch": "--batch",
    "width": "--size",
    "height": "--size",
    "seed_source": "--seed-source",
    "clip_skip": "--clip-skip",
    "strength": "--strength",
    "memory_budget": "--memory-budget",
    "refiner_switch": "--refiner-switch",
}


def _with_flag_names(message: str) -> str:
    """An error message whose leading parameter name is replaced by the CLI flag that sets it."""
    name, _, rest = message.partition(" ")
    return f"{_FLAGS[name]} {rest}" if name in _FLAGS and rest else message


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """sdlite's own warnings as one ``warning:`` line; others as Python shows them."""
    if issubclass(category, SdliteWarning):
        print(f"warning: {message}", file=sys.stderr)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``sdlite`` console script."""
    argv = sys.argv[1:] if argv is None else argv
    warnings.showwarning = _show_warning
    try:
        if argv[:1] == ["bench"]:
            return cmd_bench(argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except SdliteError as exc:
        print(f"error: {_with_flag_names(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory; try a smaller --size or --batch, --vae-tiling on or --low-memory", file=sys.stderr)
        return 1
    except Exception as exc:
        # Every input sdlite knows to be wrong has its own message above; what lands here is a bug, still reported
        # in one line (SDLITE_TRACEBACK=1 shows the traceback for a bug report).
        if os.environ.get("SDLITE_TRACEBACK"):
            raise
        print(
            f"error: unexpected {type(exc).__name__}: {summarize(exc)} (please report it; SDLITE_TRACEBACK=1 shows "
            "where)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
