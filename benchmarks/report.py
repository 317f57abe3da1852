"""Benchmark reports: the table printed and written as Markdown, report.json, a chart, and merging reports
from several machines (``sdlite bench --compare``)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REPORT_FORMAT = 1
COLUMNS = (
    "configuration",
    "compute",
    "load+compile s",
    "text enc ms",
    "U-Net ms/step median",
    "p90",
    "VAE dec ms",
    "total s",
    "peak RSS MiB",
    "stage peaks MiB (TE/U-Net/VAE)",
    "PSNR dB",
    "SSIM",
    "x limit",
    "x fastest peer",
)


def _num(value, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:,.{digits}f}"


def _ms_digits(value: float | None) -> int:
    return 1 if value is not None and value < 100 else 0


def row_cells(row: dict) -> list[str]:
    """One table row; skipped and failed rows say why in the second cell onwards."""
    name = row["name"] + (" (reference)" if row.get("reference") else "")
    if row.get("status") != "ok":
        return [name, f"{row.get('status', 'failed')}: {row.get('reason', '')}"] + [""] * (len(COLUMNS) - 2)
    unet = row.get("unet_step_ms") or {}
    stages = row.get("stage_peak_rss_mb") or {}
    stage_text = "/".join(_num(stages.get(k)) for k in ("text_encoder", "unet", "vae_decoder"))
    load = None if row.get("load_s") is None else row["load_s"] + (row.get("compile_s") or 0.0)
    return [
        name,
        row.get("compute") or "-",
        _num(load, 1),
        _num(row.get("text_encoder_ms"), _ms_digits(row.get("text_encoder_ms"))),
        _num(unet.get("median"), _ms_digits(unet.get("median"))),
        _num(unet.get("p90"), _ms_digits(unet.get("p90"))),
        _num(row.get("vae_decode_ms"), _ms_digits(row.get("vae_decode_ms"))),
        _num(row.get("total_s"), 2),
        _num(row.get("peak_rss_mb")),
        stage_text,
        _num(row.get("psnr"), 1),
        _num(row.get("ssim"), 4),
        _num(row.get("vs_limit"), 2),
        _num(row.get("vs_fastest_peer"), 2),
    ]


def row_notes(row: dict) -> list[str]:
    """What a row's figures need said beside them: a fallback it took, the export a peer needed."""
    notes = [row["note"]] if row.get("note") else []
    if (row.get("load_in_generation_s") or 0) > 0.01:
        notes.append(
            f"loads parts during the generation: {row['load_in_generation_s']:.2f} s of its total (OpenVINO then "
            "compiles each part at its first call, inside that part's time)"
        )
    if row.get("export_s"):
        notes.append(f"optimum export of the source took {row['export_s']:.1f} s (cached, not in the figures)")
    return notes


def markdown_table(rows: list[dict], label: bool = False) -> str:
    """The rows as a Markdown table (``label``: prefix each configuration with its machine, for --compare)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = row_cells(row)
        if label and row.get("machine"):
            cells[0] = f"{row['machine']}: {cells[0]}"
        lines.append("| " + " | ".join(cells) + " |")
    lines += [""] + [f"- {row_cells(row)[0]}: {note}" for row in rows for note in row_notes(row)]
    return "\n".join(lines).rstrip()


def text_table(rows: list[dict], label: bool = False) -> str:
    """The rows as an aligned plain-text table for the terminal; skipped rows on one line each."""
    header = list(COLUMNS)
    body, notes = [], []
    for row in rows:
        cells = row_cells(row)
        if label and row.get("machine"):
            cells[0] = f"{row['machine']}: {cells[0]}"
        if row.get("status") != "ok":
            notes.append(f"  {cells[0]}: {cells[1]}")
        else:
            body.append(cells)
            notes += [f"  {cells[0]}: {note}" for note in row_notes(row)]
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        # Names left-aligned, figures right-aligned.
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    lines = [line(header), "  ".join("-" * w for w in widths), *(line(cells) for cells in body)]
    return "\n".join(lines + notes)


def notes(report: dict) -> list[str]:
    """How the figures were measured, as sentences under the table."""
    settings, limit = report["settings"], report.get("limit") or {}
    lines = [
        f"model {settings.get('model_name', settings['model'])}, {settings['width']}x{settings['height']}, "
        f"{settings['steps']} steps, sampler {settings.get('sampler') or settings.get('scheduler', 'default')}, "
        f"seed {settings['seed']}, CFG {settings['cfg_scale']}, {settings['threads']} threads; "
        f"each row in its own process after a {settings['warmup_steps']}-step warm-up.",
        "U-Net ms/step: one U-Net call (both CFG halves in one batch), median and p90 over the timed generation. "
        "load+compile: Pipeline.load plus what each part's first call took beyond a warm call "
        "(OpenVINO compiles at the first call, from an empty cache here).",
        "Peak RSS: the whole process (load, warm-up, generation); stage peaks: "
        + (report.get("memory_method") or "VmHWM per stage")
        + ". PSNR/SSIM: the image against the reference row's (same seed).",
    ]
    gemm = limit.get("gemm") or {}
    if limit.get("unet_flops") is not None:
        lines.append(
            f"x limit: U-Net step time / (counted FLOPs per U-Net call {limit['unet_flops'] / 1e9:,.2f} GFLOP "
            f"/ best measured GEMM GFLOP/s at the row's compute precision); GEMM {gemm.get('size')}^3 on "
            f"{gemm.get('threads')} threads: "
            + ", ".join(f"{k} {v}" for k, v in (gemm.get("gflops") or {}).items())
            + ". FLOPs: "
            + limit.get("flops_method", "")
            + "".join(
                f"; [{Path(model).name}]: its own U-Net, {flops / 1e9:,.2f} GFLOP"
                for model, flops in (limit.get("unet_flops_by_model") or {}).items()
                if flops
            )
        )
    else:
        lines.append(f"x limit: unknown ({limit.get('reason', 'no FLOP count')}).")
    if any(r.get("kind") == "peer" for r in report["rows"]):
        lines.append("x fastest peer: U-Net step median / the fastest peer's U-Net step median in this run.")
    return lines


def targets_text(report: dict) -> list[str]:
    """The targets, each met / not met (or not applicable), one line each."""
    return [f"target {t['name']}: {t['status']} ({t['detail']})" for t in report.get("targets", [])]


def write_markdown(report: dict, path: Path, label: bool = False) -> None:
    """report.md: settings, hardware, the table, how it was measured, targets, soak."""
    hw = report.get("hardware") or {}
    lines = [f"# sdlite bench ({report.get('created', '')})", ""]
    if hw:
        lines += [
            "## Hardware",
            "",
            f"- CPU: {hw.get('cpu')} ({hw.get('physical_cores')} cores, {hw.get('logical_cpus')} threads, "
            f"{hw.get('usable_cpus')} usable); ISA: {', '.join(hw.get('isa', [])) or 'none detected'}",
            f"- RAM: {hw.get('ram_gb')} GB; OS: {hw.get('os')}",
            "- devices: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in (hw.get("devices") or {}).items()),
            "- versions: " + ", ".join(f"{k} {v}" for k, v in (hw.get("versions") or {}).items() if v),
            "",
        ]
    lines += ["## Results", "", markdown_table(report["rows"], label), ""]
    lines += [f"- {line}" for line in report.get("notes") or notes(report)]
    if report.get("targets"):
        lines += ["", "## Targets", ""] + [f"- {line}" for line in targets_text(report)]
    if report.get("soak"):
        lines += ["", "## Soak", "", *[f"    {line}" for line in soak_lines(report["soak"])]]
    lines += ["", "![latency and memory](chart.png)", ""]
    path.write_text("\n".join(lines))


def soak_lines(soak: dict) -> list[str]:
    """RSS after every tenth generation (every one for fewer than ten) and the drift."""
    rss = soak.get("rss_mb") or []
    if not rss:
        return [f"soak: {soak.get('status')}: {soak.get('reason', '')}"]
    every = max(1, len(rss) // 10)
    lines = [f"generation {i + 1:>5}: RSS {rss[i]:,.1f} MiB" for i in range(len(rss)) if (i + 1) % every == 0]
    drift = rss[-1] - rss[0]
    lines.append(
        f"drift {drift:+,.1f} MiB over {len(rss) - 1} generations after the first "
        f"({drift / max(len(rss) - 1, 1):+,.2f} MiB per generation)"
    )
    return lines


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        return ImageFont.load_default()


def write_chart(rows: list[dict], path: Path, title: str = "", label: bool = False) -> None:
    """A PNG with two horizontal bar panels: U-Net ms per step and peak RSS MiB per configuration."""
    rows = [r for r in rows if r.get("status") == "ok"]
    names = [(f"{r['machine']}: " if label and r.get("machine") else "") + r["name"] for r in rows]
    panels = [
        ("U-Net ms per step (median)", [(r.get("unet_step_ms") or {}).get("median") or 0.0 for r in rows]),
        ("peak RSS MiB", [r.get("peak_rss_mb") or 0.0 for r in rows]),
    ]
    font, small = _font(14), _font(12)
    bar, gap, label_w, plot_w, pad = 18, 6, max([len(n) for n in names] + [10]) * 7 + 20, 420, 16
    panel_h = 28 + len(rows) * (bar + gap)
    height = pad * 2 + 24 + len(panels) * (panel_h + pad)
    image = Image.new("RGB", (label_w + plot_w + 90 + pad * 2, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((pad, pad), title or "sdlite bench", fill="black", font=font)
    colours = {"sdlite": (52, 101, 164), "peer": (204, 121, 40), "reference": (120, 120, 120)}
    y = pad + 28
    for heading, values in panels:
        draw.text((pad, y), heading, fill="black", font=font)
        y += 24
        top = max(values + [1e-9])
        for name, value, row in zip(names, values, rows, strict=True):
            draw.text((pad, y + 2), name, fill="black", font=small)
            width = int(plot_w * value / top)
            x0 = pad + label_w
            draw.rectangle([x0, y, x0 + max(width, 1), y + bar], fill=colours.get(row.get("kind"), (52, 101, 164)))
            draw.text((x0 + width + 6, y + 2), f"{value:,.1f}", fill="black", font=small)
            y += bar + gap
        y += pad
    image.save(path)


def write(report: dict, folder: Path, label: bool = False) -> list[Path]:
    """report.json, report.md and chart.png in ``folder`` (created); returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / "report.json", folder / "report.md", folder / "chart.png"]
    paths[0].write_text(json.dumps(report, indent=1, default=str))
    write_markdown(report, paths[1], label)
    settings = report.get("settings") or {}
    title = f"sdlite bench: {settings.get('width')}x{settings.get('height')}, {settings.get('steps')} steps"
    write_chart(report["rows"], paths[2], title if settings else "sdlite bench --compare", label)
    return paths


def machine_name(report: dict) -> str:
    """A short name for the machine a report came from: its CPU model and host."""
    hw = report.get("hardware") or {}
    return f"{hw.get('cpu', '?')} @ {hw.get('hostname', '?')}"


def merge(reports: list[dict], names: list[str]) -> dict:
    """One report holding the rows of several (one per machine), each row labelled with its machine."""
    rows = []
    for report, name in zip(reports, names, strict=True):
        for row in report.get("rows", []):
            rows.append(row | {"machine": name})
    return {
        "format": REPORT_FORMAT,
        "compare": [
            {"machine": n, "settings": r.get("settings"), "hardware": r.get("hardware"), "limit": r.get("limit")}
            for r, n in zip(reports, names, strict=True)
        ],
        "rows": rows,
        "notes": [
            f"{n}: {s['width']}x{s['height']}, {s['steps']} steps, {s['threads']} threads, model "
            f"{s.get('model_name', s.get('model'))}"
            for n, s in ((n, r.get("settings") or {}) for r, n in zip(reports, names, strict=True))
            if s
        ],
    }
