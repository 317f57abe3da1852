"""A1111's ``<lora:...>`` tags: parsing, removal from the encoded text, and the LoRA folder's names (torch-free)."""

from __future__ import annotations

import pytest

from sdlite.errors import InputError, SdliteWarning
from sdlite.lora_graph import ldm_path
from sdlite.loras import LoraLibrary, LoraUse, parse_lora_tags, strip_extra_networks


@pytest.mark.parametrize(
    "tag, use",
    [
        ("<lora:a>", LoraUse("a", 1.0, 1.0)),
        ("<lora:a:0.8>", LoraUse("a", 0.8, 0.8)),
        ("<lora:a:0.8:0.5>", LoraUse("a", 0.8, 0.5)),
        ("<lora:a:te=0.3:unet=1.2>", LoraUse("a", 0.3, 1.2)),
        ("<lora:a:unet=0.5>", LoraUse("a", 1.0, 0.5)),
        ("<lora:a:1:1:16>", LoraUse("a", 1.0, 1.0, 16)),
        ("<lora:a:0.7:dyn=8>", LoraUse("a", 0.7, 0.7, 8)),
        ("<lyco:a:-0.5>", LoraUse("a", -0.5, -0.5)),
        ("<lora:my style v2:1e-1>", LoraUse("my style v2", 0.1, 0.1)),
    ],
)
def test_tag_forms(tag, use):
    assert parse_lora_tags(f"a castle, {tag}, at night") == [use]


def test_several_tags_keep_their_order_and_the_last_of_a_name_counts():
    uses = parse_lora_tags("<lora:b:0.2> x <lora:a:1> <lora:b:0.9>")
    assert [(u.name, u.te) for u in uses] == [("a", 1.0), ("b", 0.9)]


@pytest.mark.parametrize(
    "tag, message",
    [
        ("<lora:a:strong>", "'strong' is not a number"),
        ("<lora::1>", "no name"),
        ("<lora:a:1:1:1:1>", "too many arguments"),
        ("<lora:a:weight=1>", "unknown argument 'weight'"),
        ("<lora:a:dyn=0>", "dyn '0' must be a whole number"),
    ],
)
def test_bad_tags(tag, message):
    with pytest.raises(InputError, match=message):
        parse_lora_tags(tag)


def test_tags_are_removed_from_the_encoded_text():
    assert strip_extra_networks("a <lora:x:1>castle<lyco:y>") == "a castle"
    assert strip_extra_networks("a <cat-toy> and (b:1.2)") == "a <cat-toy> and (b:1.2)"  # not tags
    with pytest.warns(SdliteWarning, match="hypernet networks are not supported"):
        assert strip_extra_networks("a <hypernet:anime:1>") == "a "


def test_library_names_and_errors(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "style.safetensors").write_bytes(b"")
    (tmp_path / "sub" / "detail.safetensors").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a LoRA")
    library = LoraLibrary(tmp_path)
    assert library.names == ["detail", "style"]
    with pytest.raises(InputError, match="did you mean 'style'"):
        library.get("styel")
    (tmp_path / "later.safetensors").write_bytes(b"")  # a file added after the folder was read is found
    with pytest.raises(InputError, match="corrupt|not a safetensors"):
        library.get("later")
    with pytest.raises(InputError, match="folder not found"):
        LoraLibrary(tmp_path / "nope")


def test_original_sd_layer_names():
    """The LDM layout of SD 1.x's U-Net (two layers per block, no attention in the first up block)."""
    up = {1, 2, 3}
    names = {
        "down_blocks.0.attentions.1.proj_in": "input_blocks.2.1.proj_in",
        "down_blocks.1.resnets.0.conv1": "input_blocks.4.0.in_layers.2",
        "down_blocks.2.downsamplers.0.conv": "input_blocks.9.0.op",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k": "middle_block.1.transformer_blocks.0.attn2.to_k",
        "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
        "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",
        "up_blocks.1.attentions.2.proj_out": "output_blocks.5.1.proj_out",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "up_blocks.3.resnets.2.conv_shortcut": "output_blocks.11.0.skip_connection",
        "time_embedding.linear_2": "time_embed.2",
    }
    for path, ldm in names.items():
        assert ldm_path(path, 2, up) == ldm, path
    assert ldm_path("down_blocks.0.resnets.0.norm3", 2, up) is None
