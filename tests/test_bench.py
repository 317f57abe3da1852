"""The benchmark harness on the tiny model: report files and fields, compare, soak, a peer, the metrics.

No test asserts a time: speed is shown by the harness's figures, never by tests."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from sdlite.benchmarks.fidelity import SIGMA, WINDOW, psnr, ssim
from sdlite.benchmarks.memory import PeakTracker, current_rss_mb
from sdlite.cli import main as sdlite_main


def _ssim_by_windows(x: np.ndarray, y: np.ndarray) -> float:
    """Wang et al. (2004) eq. 13 window by window, with the Gaussian weights of sec. III-C (slow, direct)."""
    r = np.arange(WINDOW) - (WINDOW - 1) / 2
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * SIGMA**2))
    w = g / g.sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for i in range(x.shape[0] - WINDOW + 1):
        for j in range(x.shape[1] - WINDOW + 1):
            a, b = x[i : i + WINDOW, j : j + WINDOW], y[i : i + WINDOW, j : j + WINDOW]
            mu_a, mu_b = (w * a).sum(), (w * b).sum()
            var_a, var_b = (w * (a - mu_a) ** 2).sum(), (w * (b - mu_b) ** 2).sum()
            cov = (w * (a - mu_a) * (b - mu_b)).sum()
            values.append(((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)))
    return float(np.mean(values))


def test_ssim_matches_the_windowed_definition():
    rng = np.random.default_rng(0)
    x = rng.random((20, 17, 3))
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    expected = np.mean([_ssim_by_windows(x[..., c], y[..., c]) for c in range(3)])
    assert ssim(x, y) == pytest.approx(expected, abs=1e-12)
    assert ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    assert ssim(x, y) < 0.95  # noise lowers it clearly


def test_psnr_of_a_known_error():
    x = np.full((16, 16, 3), 0.25)
    assert psnr(x + 0.1, x) == pytest.approx(20.0, abs=1e-9)  # MSE 0.01 -> 10 log10(1 / 0.01)
    assert math.isinf(psnr(x, x))


def test_unet_flops_match_torch_flop_counter(tiny_diffusers, tiny_onnx, tmp_path):
    """Counted from the ONNX graph == torch's FlopCounterMode on the same U-Net, with attention as explicit
    matrix products (torch does not count scaled_dot_product_attention)."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    from sdlite.benchmarks.flops import _openvino_flops, unet_flops

    unet = UNet2DConditionModel.from_pretrained(tiny_diffusers / "unet")
    unet.set_attn_processor(AttnProcessor())
    context = torch.zeros(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(torch.zeros(2, 4, 8, 8), torch.tensor(10.0), context)
    graph = tiny_onnx / "unet" / "model.onnx"
    assert unet_flops(graph, 2, 64, 64) == counter.get_total_flops()
    # The OpenVINO-inferred count, used when onnx's shape inference cannot follow a graph (sliced attention).
    context_shape = [2, 77, unet.config.cross_attention_dim]
    shapes = {"sample": [2, 4, 8, 8], "encoder_hidden_states": context_shape}
    assert _openvino_flops(graph, shapes) == counter.get_total_flops()
    # An OpenVINO IR (folders converted to OpenVINO only) is counted the same way.
    import openvino as ov

    xml = tmp_path / "openvino_model.xml"
    ov.save_model(ov.convert_model(str(graph)), str(xml))
    assert unet_flops(xml, 2, 64, 64) == counter.get_total_flops()


def test_peak_tracker_sees_a_stage_allocation():
    tracker = PeakTracker()
    tracker.start("before")
    tracker.start("alloc")
    before = current_rss_mb()
    block = np.ones(64 << 20, np.uint8)  # 64 MiB, touched
    del block
    tracker.start("after")
    tracker.stop()
    assert tracker.stages["alloc"] >= before + 60
    assert tracker.stages["after"] < tracker.stages["alloc"] - 30  # the reset took: the next stage starts low
    assert tracker.whole_mb >= tracker.stages["alloc"]


@pytest.fixture(scope="module")
def bench_report(tiny_diffusers, tiny_onnx, tmp_path_factory, monkeypatch_module):
    """One bench run: onnx and OpenVINO (f32), a precision the folder lacks, the diffusers peer."""
    out = tmp_path_factory.mktemp("bench") / "report"
    code = sdlite_main(
        [
            "bench",
            "-m",
            str(tiny_onnx),
            "--size",
            "64x64",
            "--steps",
            "2",
            "--warmup-steps",
            "1",
            "--engine",
            "onnx,openvino",
            "--precision",
            "fp32,int8",
            "--compute",
            "f32",
            "--gemm-size",
            "256",
            "--peers",
            "--source",
            str(tiny_diffusers),
            "--peer",
            "diffusers-torch fp32",
            "--report",
            str(out),
            "--quiet",
        ]
    )
    assert code == 0
    return out


@pytest.fixture(scope="module")
def monkeypatch_module(tmp_path_factory):
    """OpenVINO's compile cache in a temporary folder, not the user's."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SDLITE_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield patch


def test_report_files_and_fields(bench_report):
    for name in ("report.json", "report.md", "chart.png"):
        assert (bench_report / name).stat().st_size > 0
    report = json.loads((bench_report / "report.json").read_text())
    rows = {row["name"]: row for row in report["rows"]}
    assert set(rows) == {
        "sdlite onnx fp32 f32",
        "sdlite openvino fp32 f32",
        "sdlite onnx int8 f32",
        "sdlite openvino int8 f32",
        "diffusers-torch fp32",
    }
    assert rows["sdlite onnx int8 f32"]["status"] == "skipped"
    assert "int8" in rows["sdlite onnx int8 f32"]["reason"]
    ran = [rows[n] for n in ("sdlite onnx fp32 f32", "sdlite openvino fp32 f32", "diffusers-torch fp32")]
    for row in ran:
        assert row["status"] == "ok", row
        for key in ("load_s", "text_encoder_ms", "vae_decode_ms", "total_s", "peak_rss_mb"):
            assert row[key] > 0, key
        unet = row["unet_step_ms"]
        assert len(unet["steps"]) >= 2 and 0 < unet["median"] <= unet["p90"]
        assert set(row["stage_peak_rss_mb"]) >= {"load", "text_encoder", "unet", "vae_decoder"}
        assert all(v > 0 for v in row["stage_peak_rss_mb"].values())
        assert row["peak_rss_mb"] >= max(row["stage_peak_rss_mb"].values())
        assert row["vs_limit"] > 0 and row["vs_fastest_peer"] > 0
    assert rows["sdlite onnx fp32 f32"]["reference"] and math.isinf(rows["sdlite onnx fp32 f32"]["psnr"])
    # OpenVINO in f32 and diffusers on torch reproduce the reference image (same seed, same noise).
    assert rows["sdlite openvino fp32 f32"]["psnr"] > 40 and rows["sdlite openvino fp32 f32"]["ssim"] > 0.99
    assert rows["diffusers-torch fp32"]["psnr"] > 40 and rows["diffusers-torch fp32"]["ssim"] > 0.99
    assert rows["diffusers-torch fp32"]["vs_fastest_peer"] == 1.0
    limit = report["limit"]
    assert limit["unet_flops"] > 0 and all(v > 0 for v in limit["gemm"]["gflops"].values())
    hw = report["hardware"]
    assert hw["cpu"] and hw["logical_cpus"] > 0 and hw["ram_gb"] > 0
    assert "CPUExecutionProvider" in hw["devices"]["onnxruntime"] and hw["versions"]["numpy"]
    assert [t["status"] for t in report["targets"]] and all(
        t["status"] in ("met", "not met") for t in report["targets"]
    )
    markdown = (bench_report / "report.md").read_text()
    assert "| sdlite openvino fp32 f32 | f32 |" in markdown and "skipped" in markdown


def test_compare_merges_two_reports(bench_report, tmp_path, capsys):
    report = json.loads((bench_report / "report.json").read_text())
    other = json.loads(json.dumps(report))
    other["hardware"]["hostname"] = "other-machine"
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(report))
    b.write_text(json.dumps(other))
    out = tmp_path / "merged"
    assert sdlite_main(["bench", "--compare", str(a), str(b), "--report", str(out)]) == 0
    merged = json.loads((out / "report.json").read_text())
    assert len(merged["rows"]) == 2 * len(report["rows"])
    assert {row["machine"].split(" @ ")[1] for row in merged["rows"]} == {
        report["hardware"]["hostname"],
        "other-machine",
    }
    assert (out / "chart.png").stat().st_size > 0
    assert "other-machine: sdlite onnx fp32 f32" in capsys.readouterr().out


def test_soak_prints_rss_and_drift(tiny_onnx, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("SDLITE_CACHE", str(tmp_path))
    args = ["bench", "-m", str(tiny_onnx), "--size", "64x64", "--steps", "1", "--warmup-steps", "0"]
    assert sdlite_main([*args, "--engine", "onnx", "--soak", "3", "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines[:3]] == [f"generation {i:>5}" for i in (1, 2, 3)]
    assert lines[-1].startswith("drift ")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--engine", "tensorrt"], "--engine tensorrt"),
        (["--compare", "missing.json"], "missing.json: file not found"),
        (["--peers"], "--peers needs --source"),
        (["--size", "60x64"], "--size 60x64"),
        (["--low-memory", "sometimes"], "--low-memory"),
    ],
)
def test_bad_usage_is_one_line_and_exit_2(tiny_onnx, capsys, args, message):
    assert sdlite_main(["bench", "-m", str(tiny_onnx), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_sdxl_second_text_encoder_counts_in_the_text_encoder_stage():
    from sdlite.benchmarks.stages import StageObserver, Stages

    stages = Stages(PeakTracker())
    observer = StageObserver(stages)
    for part, seconds in (("text_encoder", 0.1), ("text_encoder_2", 0.3), ("taesd_decoder", 0.05)):
        observer.before(part, "run")
        observer.after(part, "run", seconds)
    stages.finish()
    assert stages.calls["text_encoder"] == [0.1, 0.3]
    assert stages.calls["vae_decoder"] == [0.05]
    assert set(stages.tracker.stages) == {"text_encoder", "vae_decoder"}
