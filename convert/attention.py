"""Attention variants baked into the exported graphs.

- ``plain``: one (batch * heads, queries, keys) score tensor per layer, as the original SD code computes it.
  At 512x512 the first U-Net level has 4096 queries and keys: with 8 heads and CFG's batch of 2 that is
  2 * 8 * 4096 * 4096 fp32 = 1 GiB for one layer.
- ``sliced``: the same arithmetic one head at a time, so the largest score tensor is (batch, queries,
  keys), 1/heads of plain's. The loop runs over the head count, a constant of the model, so the graph stays
  valid for every batch and size (slicing over batch * heads, as diffusers' SlicedAttnProcessor does, would
  bake the traced batch size into the graph).
- ``fused``: PyTorch's scaled_dot_product_attention, exported so that each runtime runs it fused: OpenVINO
  IR is converted from the PyTorch module and keeps its ScaledDotProductAttention op; for ONNX,
  onnxruntime's transformer optimizer fuses the pattern into its MultiHeadAttention operator.
"""

from __future__ import annotations

import torch

from sdlite.convert.token_merging import apply_token_merging

ATTENTION_VARIANTS = ("plain", "sliced", "fused")


class HeadSlicedAttnProcessor:
    """diffusers attention processor computing the attention of one head at a time (Vaswani et al. 2017,
    eq. 1, per head)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if attention_mask is not None:
            raise NotImplementedError("sliced attention does not take attention masks (SD passes none)")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)  # b,hw,c
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)

        head_dim = query.shape[-1] // attn.heads
        outputs = []
        for head in range(attn.heads):
            span = slice(head * head_dim, (head + 1) * head_dim)
            q, k, v = query[..., span], key[..., span], value[..., span]  # b,len,d
            if attn.upcast_attention:
                q, k = q.float(), k.float()
            scores = torch.bmm(q, k.transpose(1, 2)) * attn.scale  # b,queries,keys
            if attn.upcast_softmax:
                scores = scores.float()
            probs = scores.softmax(dim=-1).to(v.dtype)
            outputs.append(torch.bmm(probs, v))
        hidden_states = torch.cat(outputs, dim=-1)  # b,queries,heads*d

        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def set_attention(pipe, variant: str, token_merging: float = 0.0) -> None:
    """Give the U-Net and the VAE the attention processors of ``variant``; with ``token_merging`` > 0, the
    U-Net's full-resolution self-attentions merge that fraction of their tokens first (ToMe). A module the
    converter has already released (None) is skipped."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    processor = {"plain": AttnProcessor, "sliced": HeadSlicedAttnProcessor, "fused": AttnProcessor2_0}[variant]()
    for module in (pipe.unet, pipe.vae):
        if module is not None:
            module.set_attn_processor(processor)
    if token_merging and pipe.unet is not None:
        apply_token_merging(pipe.unet, token_merging)


def _heads_from_reshape(fusion, reshape_q, is_torch2: bool = False) -> int:
    """The head count of an attention layer: the third value of the shape its Q is reshaped to."""
    import numpy as np

    if is_torch2:
        parent = fusion.model.get_parent(reshape_q, 1)
        if parent is None or parent.op_type != "Concat" or len(parent.input) != 4:
            return 0
        value = fusion.model.get_constant_value(parent.input[2])
    else:
        value = fusion.model.get_constant_value(reshape_q.input[1])
        value = value[2:3] if isinstance(value, np.ndarray) and value.shape == (4,) else None
    if not isinstance(value, np.ndarray) or value.size != 1:
        return 0
    return max(int(value.reshape(-1)[0]), 0)


def fuse_onnx_attention(graph, num_heads: int, hidden_size: int):
    """Fuse attention in an ONNX U-Net/VAE with onnxruntime's optimizer, keeping only CPU-capable fusions.

    onnxruntime's "unet" fusions include GroupNorm / NHWC-conv kernels that exist only for CUDA; those are
    turned off so the graph still runs on every execution provider."""
    import sys

    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    # onnxruntime 1.32's head-count detector calls int() on 1-element arrays, which numpy >= 2.4 refuses;
    # this reads the same constant (the head axis of Q's reshape target) without that conversion. The
    # optimizer imports its fusions as top-level modules, so that is where the class is patched.
    sys.modules["fusion_attention_unet"].FusionAttentionUnet.get_num_heads = _heads_from_reshape

    options = FusionOptions("unet")
    for flag in (
        "enable_group_norm",
        "enable_skip_group_norm",
        "enable_nhwc_conv",
        "enable_bias_splitgelu",
        "enable_bias_add",
        "enable_packed_qkv",
        "enable_packed_kv",
        "enable_bias_skip_layer_norm",
    ):
        if hasattr(options, flag):
            setattr(options, flag, False)
    model = optimize_model(
        str(graph),
        model_type="unet",
        num_heads=num_heads,
        hidden_size=hidden_size,
        optimization_options=options,
        opt_level=0,
        use_gpu=False,
    )
    fused = model.model
    # The optimizer emits com.microsoft contrib ops (Attention, MultiHeadAttention) without always declaring
    # that domain; onnx's shape inference (used by the fp16 conversion) then refuses the graph.
    if not any(entry.domain == "com.microsoft" for entry in fused.opset_import):
        entry = fused.opset_import.add()
        entry.domain, entry.version = "com.microsoft", 1
    return fused
