"""Token merging (ToMe for SD): the merge against its reference code, the export against PyTorch, and what a
user sees (infotext, sdlite info, bench with two folders)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sdlite.cli import main as sdlite_main
from sdlite.convert.token_merging import bipartite_merge

# Every test here needs torch: the exported merge against tomesd and diffusers' U-Net.
pytestmark = pytest.mark.torch


@pytest.mark.parametrize(
    ("height", "width", "ratio"),
    [(8, 8, 0.5), (7, 9, 0.5), (6, 10, 0.3), (16, 16, 0.75), (5, 4, 0.2)],
)
def test_merge_matches_tomesd(height, width, ratio):
    """Bolya & Hoffman's reference code (tomesd, destinations at each 2x2 cell's top-left) merges the same
    tokens into the same destinations: merge, a per-token function, unmerge give the same tensor."""
    tomesd_merge = pytest.importorskip("tomesd.merge")
    x = torch.randn(2, height * width, 16, generator=torch.Generator().manual_seed(height * width))
    merged = int(height * width * ratio)
    ref_merge, ref_unmerge = tomesd_merge.bipartite_soft_matching_random2d(x, width, height, 2, 2, merged, no_rand=True)
    merge, unmerge = bipartite_merge(x, height, width, ratio)
    assert merge(x).shape == (2, height * width - merged, 16)
    torch.testing.assert_close(unmerge(torch.tanh(merge(x)) * 3), ref_unmerge(torch.tanh(ref_merge(x)) * 3))


def test_merge_averages_into_the_most_similar_destination():
    # Four tokens on a 2x2 grid: one destination (top-left); ratio 0.5 merges the two most similar sources.
    x = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [1.0, 0.05]]])
    merge, unmerge = bipartite_merge(x, 2, 2, 0.5)
    merged = merge(x)
    expected_dst = (x[0, 0] + x[0, 1] + x[0, 3]) / 3
    assert merged.shape == (1, 2, 2)
    torch.testing.assert_close(merged[0, -1], expected_dst)
    restored = unmerge(merged)
    torch.testing.assert_close(restored[0, 2], x[0, 2])  # the unmerged source comes back as it was
    for position in (0, 1, 3):
        torch.testing.assert_close(restored[0, position], expected_dst)


@pytest.fixture(scope="module")
def tome_folder(tiny_diffusers, tmp_path_factory):
    from sdlite.convert.converter import convert

    out = tmp_path_factory.mktemp("tome") / "tiny-tome"
    convert(str(tiny_diffusers), out, formats=["onnx", "openvino"], token_merging=0.5, quiet=True)
    return out


def test_export_matches_pytorch_at_any_size(tome_folder, tiny_diffusers):
    """The merge indices come from the graph's shapes: the export traced at one size matches PyTorch's ToMe
    U-Net at an odd latent size and another batch, and differs from the U-Net without merging."""
    import onnxruntime as ort
    from diffusers import UNet2DConditionModel

    from sdlite.convert.attention import set_attention
    from sdlite.convert.geglu import split_geglu

    manifest = json.loads((tome_folder / "sdlite.json").read_text())
    for variant in manifest["components"]["unet"]:
        assert variant["token_merging"] == 0.5 and variant["validation"]["passed"]
    assert all(v["token_merging"] == 0 for v in manifest["components"]["vae_decoder"])

    unet = UNet2DConditionModel.from_pretrained(tiny_diffusers / "unet").eval()
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(3, 4, 9, 13, generator=gen)
    context = torch.randn(3, 77, unet.config.cross_attention_dim, generator=gen)
    timestep = torch.tensor(500.0)

    class Pipe:  # what set_attention needs: a U-Net and a VAE (none here)
        vae = torch.nn.Module()
        vae.set_attn_processor = lambda processor: None

    Pipe.unet = unet
    split_geglu(unet)
    with torch.no_grad():
        set_attention(Pipe, "plain")
        plain = unet(sample, timestep, encoder_hidden_states=context).sample.numpy()
        set_attention(Pipe, "plain", 0.5)
        merged = unet(sample, timestep, encoder_hidden_states=context).sample.numpy()
    session = ort.InferenceSession(str(tome_folder / "unet" / "model.onnx"))
    feeds = {"sample": sample.numpy(), "timestep": timestep.numpy(), "encoder_hidden_states": context.numpy()}
    exported = session.run(None, feeds)[0]
    np.testing.assert_allclose(exported, merged, atol=1e-4, rtol=1e-3)
    assert np.abs(merged - plain).max() > 1e-3


def test_infotext_and_info_name_the_ratio(tome_folder, tiny_onnx, tmp_path, capsys):
    for folder, expected in ((tome_folder, True), (tiny_onnx, False)):
        out = tmp_path / f"{folder.name}.png"
        args = ["generate", "a red circle", "-m", str(folder), "--steps", "2", "--size", "64x64", "-o", str(out)]
        assert sdlite_main([*args, "--quiet"]) == 0
        from PIL import Image

        assert ("Token merging ratio: 0.5" in Image.open(out).info["parameters"]) is expected
    assert sdlite_main(["info", str(tome_folder)]) == 0
    assert "token merging 0.5" in capsys.readouterr().out


@pytest.mark.parametrize("ratio", ["0.9", "-0.1"])
def test_ratio_out_of_range_is_one_line_and_exit_2(tiny_diffusers, tmp_path, capsys, ratio):
    out = tmp_path / "never"
    assert sdlite_main(["convert", str(tiny_diffusers), str(out), "--token-merging", ratio, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"--token-merging {float(ratio)}" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_bench_compares_two_folders_against_the_first_ones_reference(tome_folder, tiny_onnx, tmp_path, monkeypatch):
    monkeypatch.setenv("SDLITE_CACHE", str(tmp_path / "cache"))
    args = ["bench", "-m", f"{tiny_onnx},{tome_folder}", "--size", "64x64", "--steps", "2", "--warmup-steps", "0"]
    args += ["--engine", "onnx", "--precision", "fp32", "--gemm-size", "128", "--report", str(tmp_path), "--quiet"]
    assert sdlite_main(args) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    rows = {row["name"]: row for row in report["rows"]}
    # Each folder's U-Net is counted on its own: merging changes the arithmetic, and so the row's limit.
    merged_flops = report["limit"]["unet_flops_by_model"][str(tome_folder.resolve())]
    assert 0 < merged_flops != report["limit"]["unet_flops"]
    assert rows["sdlite onnx fp32 auto"]["limit_ms"] != rows["sdlite onnx fp32 auto [tiny-tome]"]["limit_ms"]
    assert set(rows) == {"sdlite onnx fp32 auto", "sdlite onnx fp32 auto [tiny-tome]"}
    assert rows["sdlite onnx fp32 auto"]["reference"] and rows["sdlite onnx fp32 auto"]["psnr"] == float("inf")
    # The merged U-Net draws a different image, measured against the first folder's.
    assert 5 < rows["sdlite onnx fp32 auto [tiny-tome]"]["psnr"] < float("inf")


def test_bench_refuses_a_folder_named_twice(tiny_onnx, capsys):
    assert sdlite_main(["bench", "-m", f"{tiny_onnx},{tiny_onnx}"]) == 2
    assert "named twice" in capsys.readouterr().err
