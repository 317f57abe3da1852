"""Writing a diffusers pipeline's weights in the original single-file layout (A1111 / model sites), key by key
from the two layouts' block structures: what the single-file tests load back."""

from __future__ import annotations

import re

import torch

_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# Widths at which the families' own hyperparameters (32 GroupNorm groups, 64-wide text heads) hold, so a file
# needs no metadata: what a real checkpoint looks like, shrunk (``dataclasses.replace`` on a tiny recipe).
LDM_SHAPED_WIDTHS = {
    "unet_groups": 32,
    "vae_channels": (32, 32, 64, 64),
    "vae_groups": 32,
    "text_hidden": 64,
    "text_ffn": 128,
    "text_heads": 1,
}


def _unet_key(key: str, config) -> str:
    """A diffusers U-Net key -> the original (LDM) key, written from the two models' block layouts."""
    step = config.layers_per_block + 1  # input blocks per down block: its resnets and one downsampler
    fixed = {
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "conv_in": "input_blocks.0.0",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        # SDXL's added embedding (pooled text and time ids).
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
    }
    for new, old in fixed.items():
        if key.startswith(new + "."):
            return old + key[len(new) :]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = step * i + j + 1
        return (
            f"input_blocks.{index}.{0 if kind == 'resnets' else 1}.{_resnet_rest(rest) if kind == 'resnets' else rest}"
        )
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{step * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{_resnet_rest(m[2])}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = step * i + j
        return (
            f"output_blocks.{index}.{0 if kind == 'resnets' else 1}.{_resnet_rest(rest) if kind == 'resnets' else rest}"
        )
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        i = int(m[1])
        has_attention = config.up_block_types[i].startswith("CrossAttn")
        return f"output_blocks.{step * i + step - 1}.{2 if has_attention else 1}.conv.{m[2]}"
    raise AssertionError(f"unmapped U-Net key {key}")


def _resnet_rest(rest: str) -> str:
    layer, _, param = rest.rpartition(".")
    return f"{_RESNET[layer]}.{param}"


def _vae_key(key: str, tensor: torch.Tensor, blocks: int) -> tuple[str, torch.Tensor]:
    key = key.replace("conv_norm_out", "norm_out")
    if m := re.match(
        r"(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", key
    ):
        part, direction, i, kind, j, rest = m.groups()
        i = int(i) if direction == "down" else blocks - 1 - int(i)  # LDM numbers decoder blocks bottom-up
        if kind == "resnets":
            return f"{part}.{direction}.{i}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}", tensor
        return f"{part}.{direction}.{i}.{'downsample' if direction == 'down' else 'upsample'}.{rest}", tensor
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}", tensor
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.*)\.(weight|bias)", key):
        # LDM's VAE attention uses 1x1 convolutions where diffusers uses linear layers.
        if m[2] != "group_norm" and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        return f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}", tensor
    return key, tensor


def to_ldm_state(pipe) -> dict[str, torch.Tensor]:
    """The pipeline's weights under the original single-file keys (SD 1.x, or SDXL base or refiner)."""
    state = {}
    for key, tensor in pipe.unet.state_dict().items():
        state["model.diffusion_model." + _unet_key(key, pipe.unet.config)] = tensor
    blocks = len(pipe.vae.config.block_out_channels)
    for key, tensor in pipe.vae.state_dict().items():
        new_key, new_tensor = _vae_key(key, tensor, blocks)
        state["first_stage_model." + new_key] = new_tensor
    if getattr(pipe, "text_encoder_2", None) is None:
        state.update({"cond_stage_model.transformer." + k: v for k, v in pipe.text_encoder.state_dict().items()})
    elif pipe.text_encoder is None:  # the SDXL refiner: OpenCLIP ViT-bigG only
        encoder = pipe.text_encoder_2
        state.update(open_clip_state(encoder, "conditioner.embedders.0.model.", encoder.text_projection.weight.T))
    else:  # SDXL base: OpenAI CLIP ViT-L, then OpenCLIP ViT-bigG
        state.update({"conditioner.embedders.0.transformer." + k: v for k, v in pipe.text_encoder.state_dict().items()})
        encoder = pipe.text_encoder_2
        state.update(open_clip_state(encoder, "conditioner.embedders.1.model.", encoder.text_projection.weight.T))
    return {k: v.contiguous() for k, v in state.items()}


def open_clip_state(
    text_encoder, prefix: str, projection: torch.Tensor, extra_layer: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """A CLIP text model's weights under OpenCLIP's keys at ``prefix`` (SD 2.x, SDXL), with its output
    ``projection`` (hidden x projected) and, for SD 2.x, the unused last block ``extra_layer``."""
    sd = text_encoder.state_dict()
    state = {
        prefix + "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        prefix + "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        prefix + "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        prefix + "text_projection": projection,
    }
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    names["self_attn.out_proj"] = "attn.out_proj"
    layers = text_encoder.config.num_hidden_layers
    for i in range(layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for param in ("weight", "bias"):
            # OpenCLIP keeps q, k and v in one input projection.
            qkv = [sd[f"{src}self_attn.{p}_proj.{param}"] for p in "qkv"]
            state[f"{dst}attn.in_proj_{param}"] = torch.cat(qkv)
            for old, new in names.items():
                state[f"{dst}{new}.{param}"] = sd[f"{src}{old}.{param}"]
    for key, tensor in (extra_layer or {}).items():
        state[f"{prefix}transformer.resblocks.{layers}.{key}"] = tensor
    return state
