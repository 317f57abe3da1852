"""``sdlite bench``: every configuration asked for, each in a fresh process, then one table and report.

sdlite bench [-m MODEL[,MODEL...]] --size 512x512 --steps 20 --engine openvino,onnx --precision fp32,int8
             [--compute f32,bf16] [--low-memory both] [--report DIR] [--peers --source DIFFUSERS]
sdlite bench --soak 100 [-m MODEL] ...        N generations in one process: RSS drift
sdlite bench --compare a.json b.json [--report DIR]
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from sdlite.benchmarks import report as reports
from sdlite.benchmarks.fidelity import psnr, ssim
from sdlite.benchmarks.gemm import best_gflops, measure_in_subprocess
from sdlite.benchmarks.hardware import default_threads, hardware
from sdlite.benchmarks.runner import DEFAULT_PROMPT, Config, Job, Settings, run_in_subprocess
from sdlite.errors import InputError, SdliteError
from sdlite.layout import required_parts


@dataclass(frozen=True)
class Target:
    """The speed and memory targets set on a recipe model at some sizes: the U-Net step against the fastest
    peer's, and the whole generation's peak RSS, in bytes or as a fraction of the leanest peer's."""

    family: str
    sizes: tuple[tuple[int, int], ...]
    step_ratio: float = 0.7
    peak_bytes: float | None = None
    peak_ratio: float | None = None


# Printed as met / not met; another model or size is measured against its family's (else SD 1.5's) targets, as
# indicative only.
TARGETS = {
    "sd15-random": Target("sd15", sizes=((512, 512),), peak_bytes=1.5e9),
    "sdxl-random": Target("sdxl", sizes=((1024, 1024), (512, 512)), peak_ratio=0.35),
}
LOW_MEMORY_CHOICES = {"off": (False,), "on": (True,), "both": (False, True)}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise InputError(f"sdlite bench: {message}")


def build_parser() -> argparse.ArgumentParser:
    """The arguments of ``sdlite bench``."""
    p = _Parser(prog="sdlite bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "-m",
        "--model",
        help="converted-model folder(s), comma-separated; the first one's f32 image is the fidelity reference "
        "and its graph gives the FLOP count (default: the packaged model)",
    )
    p.add_argument("--size", help="WIDTHxHEIGHT (default: the model's)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--engine", default="onnx,openvino", help="comma-separated: onnx, openvino")
    p.add_argument("--precision", help="comma-separated weight precisions (default: every one the model holds)")
    p.add_argument("--compute", default="auto", help="comma-separated: auto, f32, bf16, f16")
    p.add_argument("--low-memory", default="off", choices=tuple(LOW_MEMORY_CHOICES))
    p.add_argument("--device", default="CPU")
    p.add_argument("--threads", type=int, default=default_threads(), help="threads for every engine and peer")
    p.add_argument("--sampler", help="A1111 sampler name (default: the model's own scheduler)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--cfg", type=float, default=7.5, help="CFG scale (1 or less: no unconditional pass)")
    p.add_argument(
        "--vae",
        default="full",
        choices=("full", "taesd"),
        help="taesd: decode with the model's tiny VAE (peers get the same OpenVINO decoder in place of their VAE's)",
    )
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--warmup-steps", type=int, default=2, help="steps of the untimed first generation (0: none)")
    p.add_argument("--report", help="folder for report.json, report.md and chart.png")
    p.add_argument("--peers", action="store_true", help="also run peer pipelines on --source (bench extra)")
    p.add_argument("--source", help="the diffusers folder the model was converted from (for --peers)")
    p.add_argument("--peer", help="comma-separated subset of peers (default: all)")
    p.add_argument("--peer-cache", help="where optimum exports of --source are kept (default: ~/.cache/sdlite)")
    p.add_argument("--soak", type=int, default=0, help="N generations in one process; prints the RSS drift")
    p.add_argument("--compare", nargs="+", metavar="REPORT_JSON", help="merge reports into one table and chart")
    p.add_argument("--gemm-size", type=int, default=4096, help="matrix side for the GEMM throughput (0: skip)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _settings(args: argparse.Namespace, folder) -> Settings:
    from sdlite import schedulers
    from sdlite.cli import parse_size

    width, height = parse_size(args.size) if args.size else tuple(folder.manifest.default_size)
    if args.steps < 1:
        raise InputError(f"--steps {args.steps}: must be at least 1")
    if args.threads < 1:
        raise InputError(f"--threads {args.threads}: must be at least 1")
    if args.sampler:
        try:
            schedulers.canonical_name(args.sampler)
        except ValueError as exc:
            raise InputError(str(exc)) from None
    return Settings(
        model=str(folder.path.resolve()),
        width=width,
        height=height,
        steps=args.steps,
        sampler=args.sampler,
        seed=args.seed,
        prompt=args.prompt,
        cfg_scale=args.cfg,
        threads=args.threads,
        warmup_steps=max(0, args.warmup_steps),
        device=args.device,
        vae=args.vae,
    )


def _configs(args: argparse.Namespace, folders: dict) -> list[Config]:
    """Every combination asked for, on each folder (keyed as ``Config.model``: "" for the first)."""
    from sdlite.engines import ENGINES

    engines = _split(args.engine)
    for engine in engines:
        if engine not in ENGINES:
            raise InputError(f"--engine {engine}: unknown engine; known: {', '.join(ENGINES)}")
    configs = []
    for model, folder in folders.items():
        held = sorted({v.precision for v in folder.variants("unet")}, key=lambda p: (p != "fp32", p))
        precisions = _split(args.precision) if args.precision else held
        combos = itertools.product(engines, precisions, _split(args.compute), LOW_MEMORY_CHOICES[args.low_memory])
        configs += [Config(*combo, model=model) for combo in combos]
    return configs


def _open_folders(models: list[str]) -> dict:
    """The model folders by ``Config.model``: the first under "", the others under their resolved path."""
    from sdlite.model_folder import ModelFolder

    folders = [ModelFolder.open(model) for model in models]
    keys = ["", *(str(folder.path.resolve()) for folder in folders[1:])]
    if len(set(keys)) < len(keys) or str(folders[0].path.resolve()) in keys:
        raise InputError(f"-m {','.join(models)}: a folder is named twice")
    labels = [Path(key).name for key in keys[1:]]
    if len(set(labels)) < len(labels):
        raise InputError(f"-m {','.join(models)}: two folders share a name, which labels their rows; rename one")
    return dict(zip(keys, folders, strict=True))


def skip_reason(config: Config, folder) -> str | None:
    """Why ``config`` cannot run on ``folder`` (a precision it does not hold, ...), or None."""
    from sdlite.engines import ENGINE_FORMATS
    from sdlite.engines.openvino import COMPUTE_HINTS

    if config.compute not in COMPUTE_HINTS:
        return f"compute {config.compute} unknown (known: {', '.join(COMPUTE_HINTS)})"
    if config.engine == "onnx" and config.compute not in ("auto", "f32"):
        return "onnxruntime on CPU computes in f32 only"
    for component in required_parts(folder.family):
        try:
            folder.graph(component, ENGINE_FORMATS[config.engine], config.precision)
        except InputError as exc:
            return str(exc).split(": ", 1)[-1]
    return None


def _is_reference(config: Config) -> bool:
    # onnxruntime's "auto" is f32 on CPU; OpenVINO's may be bf16, so only its explicit f32 counts.
    return config.precision == "fp32" and (
        config.compute == "f32" or (config.engine, config.compute) == ("onnx", "auto")
    )


def _reference(configs: list[Config], folder) -> tuple[Config | None, bool]:
    """The configuration whose image the others are compared with, and whether it must be run in addition:
    fp32 weights computed in f32 on the first folder, onnxruntime preferred (bit-for-bit the exported graph)."""
    runnable = [c for c in configs if not c.model and skip_reason(c, folder) is None]
    candidates = sorted((c for c in runnable if _is_reference(c)), key=lambda c: (c.engine != "onnx", c.low_memory))
    if candidates:
        return candidates[0], False
    for extra in (Config("onnx", "fp32", "f32"), Config("openvino", "fp32", "f32")):
        if skip_reason(extra, folder) is None:
            return extra, True
    return None, False


def _unet_flops(folder, settings: Settings) -> tuple[int | None, str]:
    from sdlite.benchmarks.flops import unet_flops

    try:
        # Any precision has the same shapes; fp32 ONNX first, whose graph is the export itself.
        graph = folder.graph("unet", ("onnx", "openvino"), "fp32")
    except InputError:
        try:
            graph = folder.graph("unet", ("openvino",))
        except InputError:
            return None, "no fp32 or OpenVINO U-Net in the folder to count"
    batch = 2 if settings.cfg_scale > 1.0 else 1  # classifier-free guidance runs both halves in one call
    try:
        flops = unet_flops(graph, batch, settings.height, settings.width)
    except Exception as exc:  # a graph shape inference cannot follow: the limit is then unknown
        return None, f"shape inference failed ({type(exc).__name__})"
    if flops is None:
        return None, "onnx not installed or shapes unknown"
    return flops, (
        f"2 x multiply-adds of every Conv/MatMul/Gemm node of {graph.parent.name}/{graph.name}, shapes inferred "
        f"at batch {batch} (CFG), {settings.width}x{settings.height}; element-wise ops not counted"
    )


def _fidelity(rows: list[dict], images: dict[str, Path], reference: str | None) -> None:
    if reference is None or reference not in images:
        return
    ref = np.load(images[reference])
    for row in rows:
        path = images.get(row["name"])
        if path is None or row.get("status") != "ok":
            continue
        image = np.load(path)
        if image.shape != ref.shape:
            continue
        row["psnr"], row["ssim"] = psnr(image, ref), ssim(image, ref)


def _ratios(rows: list[dict], limit: dict) -> None:
    """Each ok row's U-Net step time against the machine's limit and against the fastest peer."""
    peers = [r["unet_step_ms"]["median"] for r in rows if r.get("kind") == "peer" and r.get("status") == "ok"]
    fastest_peer = min(peers) if peers else None
    for row in rows:
        if row.get("status") != "ok" or not row["unet_step_ms"].get("median"):
            continue
        step = row["unet_step_ms"]["median"]
        gflops = best_gflops(limit.get("gemm") or {}, "f32" if row.get("compute") == "f32" else "any")
        # A second folder's U-Net (bench -m A,B) may do other work (token merging): its own count.
        flops = limit.get("unet_flops_by_model", {}).get(row.get("config", {}).get("model"), limit.get("unet_flops"))
        if flops and gflops:
            row["limit_ms"] = flops / (gflops * 1e9) * 1000
            row["vs_limit"] = step / row["limit_ms"]
        if fastest_peer:
            row["vs_fastest_peer"] = step / fastest_peer


def _targets(rows: list[dict], settings: Settings, model_name: str, family: str = "sd15") -> list[dict]:
    ours = [r for r in rows if r.get("kind") in ("sdlite", "reference") and r.get("status") == "ok"]
    ours = [r for r in ours if settings.device.upper() == "CPU"]
    if not ours:
        return []
    same_family = [name for name, target in TARGETS.items() if target.family == family]
    target_model = model_name if model_name in TARGETS else (same_family or list(TARGETS))[0]
    target = TARGETS[target_model]
    size = (settings.width, settings.height)
    scope = (
        ""
        if model_name == target_model and size in target.sizes
        else f"; defined for {target_model} at {', '.join(f'{w}x{h}' for w, h in target.sizes)}, this run is "
        f"{model_name} {settings.width}x{settings.height}: indicative only"
    )
    best = min(ours, key=lambda r: r["unet_step_ms"]["median"])
    step_name = f"U-Net step <= {target.step_ratio}x the fastest peer's"
    if best.get("vs_fastest_peer") is not None:
        ratio = best["vs_fastest_peer"]
        step = {"status": "met" if ratio <= target.step_ratio else "not met", "detail": f"{best['name']}: {ratio:.2f}x"}
        step["detail"] += scope
    else:
        step = {"status": "not measured", "detail": "no peer ran (sdlite bench --peers --source DIFFUSERS_FOLDER)"}
    targets = [{"name": step_name, **step}]
    peers = [r for r in rows if r.get("kind") == "peer" and r.get("status") == "ok"]
    if target.peak_bytes is not None:
        limit_mib, peak_name = target.peak_bytes / 2**20, f"whole-generation peak RSS <= {target.peak_bytes / 1e9:g} GB"
    else:
        peak_name = f"whole-generation peak RSS <= {target.peak_ratio}x the leanest peer's"
        if not peers:
            targets.append({"name": peak_name, "status": "not measured", "detail": step["detail"]})
            return targets
        leanest = min(peers, key=lambda r: r["peak_rss_mb"])
        limit_mib = target.peak_ratio * leanest["peak_rss_mb"]
        peak_name += f" ({leanest['name']}: {leanest['peak_rss_mb']:,.0f} MiB)"
    fitting = [r for r in ours if r["peak_rss_mb"] <= limit_mib]
    targets.append(
        {
            "name": peak_name,
            "status": "met" if best["peak_rss_mb"] <= limit_mib else "not met",
            "detail": f"{best['name']} (fastest): {best['peak_rss_mb']:,.0f} MiB of {limit_mib:,.0f} MiB; "
            f"configurations within it: {', '.join(r['name'] for r in fitting) or 'none'}{scope}",
        }
    )
    return targets


def _peer_jobs(args: argparse.Namespace, settings: Settings, work: Path) -> list[tuple[Job, str | None]]:
    """(job, export job's cache folder or None) for every peer asked for."""
    from sdlite.benchmarks import peers

    names = _split(args.peer) if args.peer else list(peers.PEERS)
    for name in names:
        if name not in peers.PEERS:
            raise InputError(f"--peer {name}: unknown; known: {', '.join(peers.PEERS)}")
    if args.sampler:
        raise InputError("--peers runs every pipeline with the model's own scheduler; leave out --sampler")
    source = Path(args.source) if args.source else None
    if source is None and set(names) - {peers.OV_IR}:
        raise InputError("--peers needs --source DIFFUSERS_FOLDER (the folder the model was converted from)")
    if source is not None and (not (source / "model_index.json").is_file() or not (source / "unet").is_dir()):
        raise InputError(f"--source {source}: not a diffusers folder (no model_index.json and unet/)")
    cache = Path(args.peer_cache) if args.peer_cache else peers.default_cache_root()
    jobs = []
    for i, name in enumerate(names):
        export = peers.EXPORTS.get(name)
        options = {}
        if name == peers.OV_IR:
            try:
                options["folder"] = str(peers.ir_view(Path(settings.model), peers.IR_PRECISION, work / "ir-view"))
            except InputError as exc:  # a folder without the fp16 IR: the row says so, the other peers run
                options = {"folder": "", "skip": str(exc).split(": ", 1)[-1]}
        else:
            options["folder"] = str(peers.export_cache_dir(source, export, cache) if export else source.resolve())
        jobs.append((Job(name, settings, str(work / f"peer{i}.json"), options=options), export))
    return jobs


def _run_peers(jobs, source: str, work: Path, progress, timeout: float) -> list[dict]:
    rows = []
    exported: dict[str, dict] = {}
    for i, (job, export) in enumerate(jobs):
        folder = Path(job.options["folder"])
        if export and not folder.is_dir() and export not in exported:
            progress.set_description(f"export {export}")
            folder.parent.mkdir(parents=True, exist_ok=True)
            export_job = Job(
                f"export:{export}",
                job.settings,
                str(work / f"export{i}.json"),
                options={"source": source, "out": str(folder)},
            )
            exported[export] = run_in_subprocess(export_job, work, timeout)
        progress.set_description(job.kind)
        if job.options.get("skip"):
            result = {"status": "skipped", "reason": job.options["skip"]}
        elif export and not folder.is_dir():
            failure = exported.get(export, {})
            result = {"status": failure.get("status", "failed"), "reason": f"export: {failure.get('reason', '?')}"}
        else:
            result = run_in_subprocess(job, work, timeout)
        if export in exported and exported[export].get("export_s"):
            result["export_s"] = exported[export]["export_s"]
        rows.append({"name": job.kind, "kind": "peer", **result})
        progress.update()
    return rows


def run(args: argparse.Namespace) -> int:
    """Measure every configuration (and peers), print the table, write the report."""
    if args.model:
        models = _split(args.model)
    else:
        from sdlite.cli import _default_model

        models = [_default_model()]
    folders = _open_folders(models)
    folder = folders[""]
    settings = _settings(args, folder)
    configs = _configs(args, folders)
    if args.soak:
        return _soak(args, folders, settings, configs)
    reference, extra_reference = _reference(configs, folder)
    with tempfile.TemporaryDirectory(prefix="sdlite-bench-") as tmp:
        work = Path(tmp)
        peer_jobs = _peer_jobs(args, settings, work) if args.peers else []
        todo = [(c, False) for c in configs] + ([(reference, True)] if extra_reference else [])
        progress = tqdm(total=len(todo) + len(peer_jobs) + 1, desc="bench", unit="run", disable=args.quiet)
        rows, images = [], {}
        for i, (config, is_extra) in enumerate(todo):
            name = f"sdlite {config.label}"
            progress.set_description(name)
            reason = skip_reason(config, folders[config.model])
            if reason:
                result = {"status": "skipped", "reason": reason}
            else:
                job = Job("sdlite", settings, str(work / f"run{i}.json"), config)
                # An empty compiled-model cache per configuration: OpenVINO's compile time is measured cold
                # whatever ran before (the warm-up fills it, as a user's first run does).
                result = run_in_subprocess(job, work, args.timeout, {"SDLITE_CACHE": str(work / f"cache{i}")})
                if Path(job.result).with_suffix(".npy").is_file():
                    images[name] = Path(job.result).with_suffix(".npy")
            kind = "reference" if is_extra else "sdlite"
            rows.append(
                {"name": name, "kind": kind, "config": asdict(config), "reference": config == reference, **result}
            )
            progress.update()
        source = str(Path(args.source).resolve()) if args.peers and args.source else None
        rows += _run_peers(peer_jobs, source, work, progress, args.timeout)
        for row, (job, _) in zip(rows[len(todo) :], peer_jobs, strict=True):
            if Path(job.result).with_suffix(".npy").is_file():
                images[row["name"]] = Path(job.result).with_suffix(".npy")
        progress.set_description("GEMM limit")
        gemm = measure_in_subprocess(args.gemm_size, settings.threads) if args.gemm_size > 0 else {}
        progress.update()
        progress.close()
        _fidelity(rows, images, f"sdlite {reference.label}" if reference else None)
    flops, flops_method = _unet_flops(folder, settings)
    limit = {"gemm": gemm, "unet_flops": flops, "flops_method": flops_method}
    if len(folders) > 1:
        limit["unet_flops_by_model"] = {key: _unet_flops(other, settings)[0] for key, other in folders.items() if key}
    if flops is None:
        limit["reason"] = flops_method
    _ratios(rows, limit)
    report = {
        "format": reports.REPORT_FORMAT,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "settings": asdict(settings)
        | {
            "model_name": folder.manifest.name,
            "source": args.source,
            # Without --sampler every pipeline (peers too) runs the model's own scheduler.
            "scheduler": f"the model's own ({folder.scheduler_config.get('_class_name', '?')})",
        },
        "hardware": hardware(),
        "limit": limit,
        "memory_method": next((r["memory_method"] for r in rows if r.get("memory_method")), None),
        "rows": rows,
    }
    report["targets"] = _targets(rows, settings, folder.manifest.name, folder.family)
    print(reports.text_table(rows))
    for line in reports.notes(report) + reports.targets_text(report):
        print(line)
    if args.report:
        for path in reports.write(report, Path(args.report)):
            print(f"wrote {path}")
    return 0


def _soak(args: argparse.Namespace, folders: dict, settings: Settings, configs: list[Config]) -> int:
    """``--soak N``: N generations of the first configuration that can run, in one process."""
    runnable = [c for c in configs if skip_reason(c, folders[c.model]) is None]
    if not runnable:
        raise InputError("--soak: no configuration can run on this model (check --engine and --precision)")
    config = runnable[0]
    with tempfile.TemporaryDirectory(prefix="sdlite-soak-") as tmp:
        job = Job("soak", settings, str(Path(tmp) / "soak.json"), config, soak=args.soak)
        if not args.quiet:
            print(f"soak: {args.soak} generations of sdlite {config.label} in one process", file=sys.stderr)
        result = run_in_subprocess(job, Path(tmp), args.timeout * max(1, args.soak))
    if result.get("status") != "ok":
        raise SdliteError(f"soak failed: {result.get('reason')}")
    result["name"] = f"sdlite {config.label}"
    for line in reports.soak_lines(result):
        print(line)
    if args.report:
        folder_out = Path(args.report)
        folder_out.mkdir(parents=True, exist_ok=True)
        path = folder_out / "soak.json"
        path.write_text(json.dumps({"settings": asdict(settings), "hardware": hardware(), "soak": result}, indent=1))
        print(f"wrote {path}")
    return 0


def compare(args: argparse.Namespace) -> int:
    """Merge report.json files (from different machines) into one table, chart and report."""
    loaded, names = [], []
    for path in args.compare:
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise InputError(f"--compare {path}: file not found") from None
        except json.JSONDecodeError as exc:
            raise InputError(f"--compare {path}: not a JSON report ({exc})") from None
        if not isinstance(data, dict) or "rows" not in data:
            raise InputError(f"--compare {path}: not an sdlite bench report (no rows)")
        loaded.append(data)
        names.append(reports.machine_name(data))
    # Two reports from one machine still need distinct labels.
    names = [f"{n} #{i + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]
    merged = reports.merge(loaded, names)
    print(reports.text_table(merged["rows"], label=True))
    for line in merged["notes"]:
        print(line)
    if args.report:
        for path in reports.write(merged, Path(args.report), label=True):
            print(f"wrote {path}")
    return 0


def main(argv: list[str]) -> int:
    """Entry point of ``sdlite bench``; user mistakes raise InputError (one line, exit code 2)."""
    args = build_parser().parse_args(argv)
    if args.compare:
        return compare(args)
    return run(args)


def run_main(argv: list[str] | None = None) -> int:
    """``main`` for ``python -m``: errors as one line on stderr, as the ``sdlite`` command prints them."""
    try:
        return main(sys.argv[1:] if argv is None else argv)
    except SdliteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(run_main())
