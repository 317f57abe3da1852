"""GEGLU feed-forward layers exported as two projections instead of one projection split in halves.

SD's transformer blocks use GEGLU (Shazeer 2020, "GLU Variants Improve Transformer", eq. 6):
``x W_v * GELU(x W_g)``, with ``W_v`` and ``W_g`` stored as one (2 * inner, dim) matrix whose output diffusers
splits with ``chunk(2)``. OpenVINO's CPU plugin runs that split with a reference (unvectorised) kernel: 17
splits cost 44-52 ms of a W8A8 SD 1.5 U-Net step at 512x512 (PERF_COUNT). Two matrices of half the size do the
same arithmetic and leave nothing to split: step 1.256 -> 1.184 s (README). The weights are views of the
original ones: no copy is made.
"""

from __future__ import annotations

import torch
from torch import nn


class SplitGEGLU(nn.Module):
    """GEGLU with its value and gate projections as separate linear layers (same weights, same outputs)."""

    def __init__(self, geglu: nn.Module):
        super().__init__()
        weight, bias = geglu.proj.weight, geglu.proj.bias
        inner = weight.shape[0] // 2
        self.value = _half(weight[:inner], None if bias is None else bias[:inner])
        self.gate = _half(weight[inner:], None if bias is None else bias[inner:])

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # GELU in its exact (erf) form, as diffusers' GEGLU computes it on CPU.
        return self.value(hidden_states) * nn.functional.gelu(self.gate(hidden_states))


def _half(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


def split_geglu(model: nn.Module) -> int:
    """Replace every diffusers GEGLU in ``model`` by a SplitGEGLU, in place; the number replaced."""
    from diffusers.models.activations import GEGLU

    targets = [(parent, name) for parent in model.modules() for name, child in parent.named_children()]
    replaced = 0
    for parent, name in targets:
        child = getattr(parent, name)
        if type(child) is GEGLU:
            setattr(parent, name, SplitGEGLU(child))
            replaced += 1
    return replaced
