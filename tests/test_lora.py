"""LoRA files fused at conversion, checked against diffusers' own ``load_lora_weights`` + ``fuse_lora``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sdlite.cli import main
from sdlite.convert.lora import LoraSpec, fuse_loras
from sdlite.errors import InputError

pytest.importorskip("peft")  # diffusers' LoRA loader, the reference, needs it

# Every test here needs torch: sdlite.convert's LoRA fusion against diffusers' loader.
pytestmark = pytest.mark.torch

RANK = 4
# Fused weights vs diffusers' fused weights: same float32 arithmetic, different summation order.
ATOL = 1e-5


def _targets(pipe) -> dict[str, dict[str, torch.Tensor]]:
    """The layers the test LoRAs change: attention and feed-forward linears, 1x1 and 3x3 convolutions."""
    unet, text = {}, {}
    for name, module in pipe.unet.named_modules():
        if name.endswith(("attn1.to_q", "attn1.to_v", "attn2.to_k", "attn2.to_out.0", "ff.net.0.proj", "proj_in")):
            unet[name] = module.weight
        elif name.endswith("resnets.0.conv1") and "down_blocks" in name:
            unet[name] = module.weight  # 3x3 convolution: LoCon-style conv LoRA
    for name, module in pipe.text_encoder.named_modules():
        if name.endswith(("self_attn.q_proj", "self_attn.out_proj", "mlp.fc1")):
            text[name] = module.weight
    return {"unet": unet, "text_encoder": text}


def _random_lora(targets, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for component, weights in targets.items():
        for name, weight in weights.items():
            out_dim, in_dim, *kernel = weight.shape
            down = torch.randn(RANK, in_dim, *kernel, generator=generator) * 0.2
            up = torch.randn(out_dim, RANK, *([1] * len(kernel)), generator=generator) * 0.2
            layers[(component, name)] = (down, up)
    return layers


def _write_kohya(layers, path, alpha: float) -> None:
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    state = {}
    for (component, name), (down, up) in layers.items():
        key = prefix[component] + name.replace(".", "_")
        state[f"{key}.lora_down.weight"] = down.contiguous()
        state[f"{key}.lora_up.weight"] = up.contiguous()
        state[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(state, path)


def _write_peft(layers, path) -> None:
    state = {}
    for (component, name), (down, up) in layers.items():
        state[f"{component}.{name}.lora_A.weight"] = down.contiguous()
        state[f"{component}.{name}.lora_B.weight"] = up.contiguous()
    save_file(state, path)


@pytest.fixture(scope="module")
def lora_files(tiny_diffusers, tmp_path_factory):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_diffusers)
    targets = _targets(pipe)
    folder = tmp_path_factory.mktemp("loras")
    kohya, peft = folder / "style.safetensors", folder / "other.safetensors"
    _write_kohya(_random_lora(targets, 1), kohya, alpha=2.0)  # scale alpha / rank = 0.5
    _write_peft(_random_lora(targets, 2), peft)  # no alpha: scale 1
    return kohya, peft


def _load(tiny_diffusers):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_diffusers, torch_dtype=torch.float32)


def _reference(tiny_diffusers, files_and_weights):
    """diffusers: load each LoRA as an adapter, fuse it at its weight, unload the adapter."""
    pipe = _load(tiny_diffusers)
    for i, (path, weight) in enumerate(files_and_weights):
        pipe.load_lora_weights(str(path), adapter_name=f"a{i}")
        pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=weight, adapter_names=[f"a{i}"])
        pipe.unload_lora_weights()
    return pipe


def _max_diff(a, b, component: str) -> float:
    sa, sb = getattr(a, component).state_dict(), getattr(b, component).state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


@pytest.mark.parametrize("layout", ["kohya", "peft", "both"])
def test_fused_weights_match_diffusers(tiny_diffusers, lora_files, layout):
    kohya, peft = lora_files
    chosen = {"kohya": [(kohya, 0.8)], "peft": [(peft, 0.5)], "both": [(kohya, 0.8), (peft, 0.5)]}[layout]
    ours = _load(tiny_diffusers)
    records = fuse_loras(ours, [LoraSpec(path, weight) for path, weight in chosen])
    reference = _reference(tiny_diffusers, chosen)
    base = _load(tiny_diffusers)
    for component in ("unet", "text_encoder"):
        # The LoRAs really change the weights, so a loader that skipped layers would fail below.
        assert _max_diff(ours, base, component) > 1e-2
        assert _max_diff(ours, reference, component) < ATOL, component
    expected_layers = sum(len(v) for v in _targets(base).values())
    assert [r["layers"] for r in records] == [expected_layers] * len(chosen)
    assert [r["weight"] for r in records] == [w for _, w in chosen]


def test_spec_parsing():
    assert LoraSpec.parse("style.safetensors:0.8") == LoraSpec(Path("style.safetensors"), 0.8)
    assert LoraSpec.parse("style.safetensors").weight == 1.0
    assert LoraSpec.parse("C:\\loras\\a.safetensors:-0.5").weight == -0.5
    assert str(LoraSpec.parse("C:\\loras\\a.safetensors").path) == "C:\\loras\\a.safetensors"


def test_convert_records_loras_and_infotext(tiny_diffusers, lora_files, tmp_path):
    from sdlite import Pipeline

    kohya, peft = lora_files
    out = tmp_path / "fused"
    assert (
        main(["convert", str(tiny_diffusers), str(out), "--quiet", "--lora", f"{kohya}:0.8", "--lora", f"{peft}:0.5"])
        == 0
    )
    manifest = json.loads((out / "sdlite.json").read_text())
    assert [(r["name"], r["weight"]) for r in manifest["loras"]] == [("style", 0.8), ("other", 0.5)]
    assert all(len(r["sha256"]) == 64 and len(r["a1111_hash"]) == 64 for r in manifest["loras"])

    # The exported text encoder computes what diffusers' fused one does.
    import onnxruntime as ort

    reference = _reference(tiny_diffusers, [(kohya, 0.8), (peft, 0.5)])
    ids = reference.tokenizer(["a red circle"], padding="max_length", max_length=77, return_tensors="np").input_ids
    session = ort.InferenceSession(str(out / "text_encoder" / "model.onnx"))
    (hidden,) = session.run(["last_hidden_state"], {"input_ids": ids.astype(np.int64)})
    with torch.no_grad():
        expected = reference.text_encoder(torch.from_numpy(ids))[0].numpy()
    assert np.abs(hidden - expected).max() < 1e-4

    image = Pipeline.load(out).txt2img("a red circle", steps=1, seed=1)[0]
    hashes = [r["a1111_hash"][:12] for r in manifest["loras"]]
    assert f'Lora hashes: "style: {hashes[0]}, other: {hashes[1]}"' in image.info["parameters"]


def test_bad_lora_files(tiny_diffusers, tmp_path):
    pipe = _load(tiny_diffusers)
    wrong_size = tmp_path / "wrong.safetensors"
    save_file(
        {
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 768, 1, 1),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4, 1, 1),
        },
        wrong_size,
    )
    with pytest.raises(InputError, match="another model size"):
        fuse_loras(pipe, [LoraSpec(wrong_size)])
    unknown = tmp_path / "unknown.safetensors"
    save_file(
        {
            "lora_unet_no_such_layer.lora_down.weight": torch.zeros(4, 4),
            "lora_unet_no_such_layer.lora_up.weight": torch.zeros(4, 4),
        },
        unknown,
    )
    with pytest.raises(InputError, match="matches no unet layer"):
        fuse_loras(pipe, [LoraSpec(unknown)])
    loha = tmp_path / "loha.safetensors"
    save_file({"lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, loha)
    with pytest.raises(InputError, match="a LoHa file"):
        fuse_loras(pipe, [LoraSpec(loha)])


def test_missing_lora_file_is_one_line(tiny_diffusers, tmp_path, capsys):
    assert (
        main(["convert", str(tiny_diffusers), str(tmp_path / "out"), "--quiet", "--lora", "nope.safetensors:0.5"]) == 2
    )
    assert "--lora nope.safetensors: file not found" in capsys.readouterr().err


def test_original_sd_key_names_fuse_as_diffusers_names(tiny_diffusers, lora_files, tmp_path):
    """kohya files that name U-Net layers as the original SD checkpoint does (input_blocks_1_1_...) fuse the same."""
    from safetensors.torch import load_file

    from sdlite.lora_graph import ldm_path

    kohya, _ = lora_files
    unet = _load(tiny_diffusers).unet
    dotted = {name.replace(".", "_"): name for name, _ in unet.named_modules()}
    up_attention = {i for i, kind in enumerate(unet.config.up_block_types) if "CrossAttn" in kind}
    renamed = {}
    for key, tensor in load_file(kohya).items():
        name, _, rest = key.partition(".")
        if name.startswith("lora_unet_"):
            path = ldm_path(dotted[name.removeprefix("lora_unet_")], unet.config.layers_per_block, up_attention)
            name = "lora_unet_" + path.replace(".", "_")
        renamed[f"{name}.{rest}"] = tensor
    ldm = tmp_path / "ldm.safetensors"
    save_file(renamed, ldm)
    ours, theirs = _load(tiny_diffusers), _load(tiny_diffusers)
    fuse_loras(ours, [LoraSpec(ldm, 0.8)])
    fuse_loras(theirs, [LoraSpec(kohya, 0.8)])
    assert _max_diff(ours, theirs, "unet") == 0


def test_sdxl_lora_fuses_as_diffusers_fuses_it(tmp_path):
    """An SDXL LoRA in kohya's layout (lora_unet_ with the original SDXL names, lora_te1_, lora_te2_) fused at
    conversion equals diffusers' StableDiffusionXLPipeline.load_lora_weights + fuse_lora, in all three parts."""
    from diffusers import StableDiffusionXLPipeline

    from sdlite.lora_graph import ldm_path
    from sdlite.models.recipes import build

    folder = build("tiny-sdxl", tmp_path / "tiny-sdxl")
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    targets = _targets(pipe)
    # The layers of the first encoder's set: diffusers 0.39's kohya loader drops text_encoder_2's k_proj and v_proj
    # ("unexpected keys"), so a reference with them would be wrong.
    targets["text_encoder_2"] = {
        name: module.weight
        for name, module in pipe.text_encoder_2.named_modules()
        if name.endswith(("self_attn.q_proj", "self_attn.out_proj", "mlp.fc1"))
    }
    up_attention = {i for i, kind in enumerate(pipe.unet.config.up_block_types) if "CrossAttn" in kind}
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    state = {}
    for (component, name), (down, up) in _random_lora(targets, 3).items():
        if component == "unet":  # kohya's SDXL files name U-Net layers as the original checkpoint does
            name = ldm_path(name, pipe.unet.config.layers_per_block, up_attention)
        key = prefix[component] + name.replace(".", "_")
        state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(2.0)})
    path = tmp_path / "xl-style.safetensors"
    save_file(state, path)

    ours = StableDiffusionXLPipeline.from_pretrained(folder)
    records = fuse_loras(ours, [LoraSpec(path, 0.7)])
    reference = StableDiffusionXLPipeline.from_pretrained(folder)
    reference.load_lora_weights(str(path), adapter_name="xl")
    reference.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"], lora_scale=0.7, adapter_names=["xl"])
    reference.unload_lora_weights()
    for component in ("unet", "text_encoder", "text_encoder_2"):
        assert _max_diff(ours, pipe, component) > 1e-2, component
        assert _max_diff(ours, reference, component) < ATOL, component
    assert records[0]["layers"] == sum(len(v) for v in targets.values())
