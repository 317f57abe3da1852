"""Refuse a generation that cannot fit in memory before it starts, with the estimate and what would fit.

A too-large size does not fail cleanly on its own: the engine allocates until the kernel kills the process or
onnxruntime aborts in native code, often minutes in. The guard estimates the working set of each stage from
the model's configs and compares the largest with the memory available:

- U-Net: self-attention scores, (copies x heads, N, N) float32 per layer at N latent cells of the finest
  attention level, where copies = batch x 2 with classifier-free guidance. onnxruntime materialises them for
  the plain graph several times over (the score matrix, its scaled and softmaxed forms, the arena's rounding):
  measured peaks above the weights are 6.2 to 7.6 times one score tensor (SD 1.5 at 512x512: 6.6 GB over
  1.07 GB; the embedded model at 256 and 512), so 8 is used. A graph converted with one head at a time
  (sliced) holds one head's; a fused graph (MultiHeadAttention) about two copies of all heads; OpenVINO fuses
  attention into a kernel that never holds the scores, so only its feature maps count.
- VAE decoder: bytes per output pixel measured on SD 1.5's VAE (``sdlite.vae``), scaled by the decoder's
  width; with tiling, one tile's worth.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sdlite.errors import InputError
from sdlite.vae import DECODER_BYTES_PER_PIXEL, available_memory

# Live score tensors per attention layer (see above) by graph attention variant, for onnxruntime.
ONNXRUNTIME_SCORE_COPIES = {"plain": 8.0, "fused": 2.0}
# Feature maps alive at once at the U-Net's finest level (residual, norm, conv output, skip connection ...).
FEATURE_MAPS = 12
# SD 1.5's VAE decoder, whose per-pixel working set DECODER_BYTES_PER_PIXEL measures, is this wide at full size.
_MEASURED_DECODER_WIDTH = 128
# Share of the available memory a generation may plan to use: the rest absorbs estimation error and allocator
# slack.
USABLE_SHARE = 0.9


@dataclass(frozen=True)
class UNetShape:
    """What the working set of a U-Net depends on: channels and heads per level, which levels attend."""

    channels: tuple[int, ...]
    heads: tuple[int, ...]
    attends: tuple[bool, ...]
    attention: str = "plain"  # the converted graph's attention variant: plain, sliced or fused

    @classmethod
    def from_config(cls, config: dict, attention: str = "plain") -> UNetShape:
        """From a diffusers U-Net ``config.json`` (SD's ``attention_head_dim`` is the number of heads)."""
        channels = tuple(int(c) for c in config.get("block_out_channels", (320, 640, 1280, 1280)))
        heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
        heads = tuple(int(h) for h in heads) if isinstance(heads, (list, tuple)) else (int(heads),) * len(channels)
        blocks = config.get("down_block_types", ["CrossAttnDownBlock2D"] * len(channels))
        attends = tuple("CrossAttn" in str(block) for block in blocks)
        return cls(channels, heads, attends, attention)


def _gb(value: float) -> str:
    for unit, scale in (("PB", 1e15), ("TB", 1e12)):
        if value >= scale:
            return f"{value / scale:,.1f} {unit}"
    return f"{value / 1e9:,.1f} GB"


@dataclass(frozen=True)
class MemoryGuard:
    """Estimates a generation's working set for one model and engine and refuses what cannot fit."""

    unet: UNetShape
    factor: int  # pixels per latent cell along each side
    decoder_width: int  # the VAE decoder's channels at full resolution
    engine: str
    # Output pixels the VAE decoder works on at once for an image of (width, height): ``LatentCodec.decode_pixels``.
    decode_pixels: Callable[[int, int], int]

    def unet_bytes(self, width: int, height: int, copies: int) -> tuple[float, str]:
        """Bytes of the U-Net's activations for one evaluation, and the level that needs them most."""
        worst, where = 0.0, ""
        cells_w, cells_h = width // self.factor, height // self.factor
        for level, (channels, heads, attends) in enumerate(
            zip(self.unet.channels, self.unet.heads, self.unet.attends, strict=False)
        ):
            tokens = (cells_w >> level) * (cells_h >> level)
            need = float(copies) * channels * tokens * 4 * FEATURE_MAPS
            if attends and self.engine == "onnx":
                if self.unet.attention == "sliced":
                    scores = ONNXRUNTIME_SCORE_COPIES["plain"] * copies * tokens * tokens * 4
                else:
                    scores = ONNXRUNTIME_SCORE_COPIES[self.unet.attention] * copies * heads * tokens * tokens * 4
                need += scores
            if need > worst:
                worst, where = need, f"the U-Net at {cells_w >> level}x{cells_h >> level} latent cells"
        return worst, where

    def decoder_bytes(self, pixels: int) -> float:
        """Bytes the VAE decoder holds while it works on ``pixels`` output pixels at once."""
        return DECODER_BYTES_PER_PIXEL * pixels * self.decoder_width / _MEASURED_DECODER_WIDTH

    def estimate(self, width: int, height: int, batch: int, guided: bool) -> tuple[float, str]:
        """(bytes, which stage) of the largest stage of one generation."""
        unet, where = self.unet_bytes(width, height, batch * (2 if guided else 1))
        decoder = self.decoder_bytes(self.decode_pixels(width, height))
        return (unet, where) if unet >= decoder else (decoder, "the VAE decoder")

    def check(
        self,
        width: int,
        height: int,
        batch: int,
        guided: bool,
        weights_to_load: int = 0,
        available: int | None = None,
    ) -> None:
        """Raise a one-line InputError when the generation would not fit in the memory available now (plus
        ``weights_to_load``, bytes of parts still to be loaded), naming the estimate and a size that fits."""
        available = available_memory() if available is None else available
        usable = available * USABLE_SHARE - weights_to_load
        need, where = self.estimate(width, height, batch, guided)
        if need <= usable:
            return
        fits = self._largest_fitting(width, height, batch, guided, usable)
        hint = f"about {fits[0]}x{fits[1]} fits" if fits else "no size fits"
        raise InputError(
            f"image size {width}x{height}: needs about {_gb(need)} for {where}, {_gb(max(usable, 0))} of memory can be "
            f"used now; {hint} (a smaller batch, --vae-tiling on or a graph converted with --attention sliced "
            "need less)"
        )

    def _largest_fitting(
        self, width: int, height: int, batch: int, guided: bool, usable: float
    ) -> tuple[int, int] | None:
        """The largest size of the same aspect ratio (multiples of 8) whose estimate fits, by bisection."""
        low, high = 0.0, 1.0
        for _ in range(30):
            mid = (low + high) / 2
            w, h = max(8, int(width * mid) // 8 * 8), max(8, int(height * mid) // 8 * 8)
            if self.estimate(w, h, batch, guided)[0] <= usable:
                low = mid
            else:
                high = mid
        # Multiples of 64 where possible: every level of an SD U-Net then halves evenly.
        step = 64 if min(width, height) * low >= 64 else 8
        w, h = int(width * low) // step * step, int(height * low) // step * step
        return (w, h) if w >= 8 and h >= 8 else None
