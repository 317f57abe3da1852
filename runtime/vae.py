"""The VAE stages: images to latents (encoder) and latents to images (decoder), tiled when large; and the tiny
autoencoder (TAESD) that can stand in for both."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

import numpy as np

from sdlite.engines import Engine
from sdlite.errors import InputError, check_finite
from sdlite.layout import LATENT_CHANNELS, TINY_VAE_DECODER, TINY_VAE_ENCODER
from sdlite.tiling import run_tiled

TILING_MODES = ("auto", "on", "off")
# Which autoencoder makes the images: the model's own, or the tiny one converted beside it (TAESD).
VAE_CHOICES = ("full", "taesd")
# Decoder working set per output pixel, measured on SD 1.5's VAE with onnxruntime (3.46 GB for one
# 1024x1024 decode; benchmarks/vae_tiling.py):
# the last up-block holds several 128-channel fp32 maps at full resolution.
DECODER_BYTES_PER_PIXEL = 3300
# log-variance clamp of the diagonal Gaussian posterior (diffusers' DiagonalGaussianDistribution).
_LOGVAR_RANGE = (-30.0, 20.0)


def available_memory() -> int:
    """Bytes of memory available to this process now (MemAvailable on Linux, else physical memory)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _unit_images(samples: np.ndarray) -> np.ndarray:
    """A decoder's output (N, 3, H, W) in -1..1 -> images (N, H, W, 3) in 0..1."""
    return np.clip(samples / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)


class LatentCodec(Protocol):
    """Pixels to latents and back: what the denoising loop works in. ``channels`` latent channels, each latent
    cell covering ``factor`` x ``factor`` pixels; images are (N, 3, H, W) in -1..1 going in and (N, H, W, 3) in
    0..1 coming out; latents are already scaled (and shifted) for the U-Net."""

    channels: int
    factor: int
    # The parts that run each way (the pool's names), and whether encoding samples a posterior (draws noise).
    encoder_part: str
    decoder_part: str
    samples_posterior: bool

    def encode_latents(self, pixels: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """Latents of ``pixels``, sampled from the posterior with standard normal ``noise`` where there is one."""

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Images of ``latents``."""

    def decode_pixels(self, width: int, height: int) -> int:
        """Output pixels the decoder works on at once for an image of ``width`` x ``height`` (a tile's when tiled)."""


class Vae:
    """Encoder and decoder of one model, with optional tiling.

    ``tiling="auto"`` tiles when the decoder's estimated working set for the image exceeds
    ``budget_bytes`` (default: half the memory available when the pipeline starts)."""

    encoder_part, decoder_part, samples_posterior = "vae_encoder", "vae_decoder", True

    def __init__(
        self,
        engine: Callable[[str], Engine],
        scaling_factor: float,
        tiling: str = "auto",
        budget_bytes: int | None = None,
        tile_latent: int = 32,
        overlap_latent: int = 8,
        channels: int = LATENT_CHANNELS,
        factor: int = 8,
    ):
        if tiling not in TILING_MODES:
            raise InputError(f"--vae-tiling {tiling}: unknown; known: {', '.join(TILING_MODES)}")
        if not 0 <= overlap_latent < tile_latent:
            raise InputError(f"VAE tile overlap {overlap_latent} must be below the tile size {tile_latent}")
        self._engine = engine
        self.scaling_factor = scaling_factor
        self.channels = channels
        self.factor = factor
        self.tiling = tiling
        self.budget_bytes = budget_bytes if budget_bytes is not None else available_memory() // 2
        self.tile_latent = tile_latent
        self.overlap_latent = overlap_latent

    def uses_tiles(self, latent_height: int, latent_width: int) -> bool:
        """Whether an image of this latent size is processed in tiles."""
        if self.tiling == "off" or max(latent_height, latent_width) <= self.tile_latent:
            return False
        if self.tiling == "on":
            return True
        pixels = latent_height * latent_width * self.factor**2
        return pixels * DECODER_BYTES_PER_PIXEL > self.budget_bytes

    def decode_pixels(self, width: int, height: int) -> int:
        """Output pixels the decoder works on at once for an image of ``width`` x ``height`` (a tile's when tiled)."""
        if self.uses_tiles(height // self.factor, width // self.factor):
            return (self.tile_latent * self.factor) ** 2
        return width * height

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents (N, 4, h, w) -> images (N, 8h, 8w, 3) in 0..1; one image at a time to bound memory."""
        decoder = self._engine(self.decoder_part)

        def run(x: np.ndarray) -> np.ndarray:
            return decoder.run({"latent_sample": x})["sample"].astype(np.float32)

        tiled = self.uses_tiles(*latents.shape[-2:])
        images = []
        for i in range(len(latents)):
            scaled = (latents[i : i + 1] / self.scaling_factor).astype(np.float32)
            if tiled:
                images.append(run_tiled(scaled, run, self.tile_latent, self.overlap_latent, self.factor))
            else:
                images.append(run(scaled))
        return _unit_images(np.concatenate(images))

    def encode(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images (N, 3, H, W) in -1..1 -> the posterior's (mean, std), each (N, 4, H/8, W/8), unscaled."""
        encoder = self._engine(self.encoder_part)

        def run(x: np.ndarray) -> np.ndarray:
            return encoder.run({"sample": x})["latent_parameters"].astype(np.float32)

        tiled = self.uses_tiles(pixels.shape[-2] // self.factor, pixels.shape[-1] // self.factor)
        params = []
        for i in range(len(pixels)):
            image = pixels[i : i + 1].astype(np.float32)
            if tiled:
                tile, overlap = self.tile_latent * self.factor, self.overlap_latent * self.factor
                params.append(run_tiled(image, run, tile, overlap, 1 / self.factor))
            else:
                params.append(run(image))
        mean, logvar = np.split(np.concatenate(params), 2, axis=1)
        check_finite(mean, "the VAE encoder")
        return mean, np.exp(0.5 * np.clip(logvar, *_LOGVAR_RANGE)).astype(np.float32)

    def encode_latents(self, pixels: np.ndarray, noise: np.ndarray) -> np.ndarray:
        """A sample of the posterior (mean + std * noise), scaled to the U-Net's latent space."""
        mean, std = self.encode(pixels)
        return ((mean + std * noise) * self.scaling_factor).astype(np.float32)


class TinyVae:
    """TAESD (Bohan 2023, github.com/madebyollin/taesd; diffusers' ``AutoencoderTiny``): an encoder and decoder
    distilled from the model's VAE that work on the U-Net's latents directly and cost a small fraction of its
    time. The encoder is deterministic (no posterior to sample). Not tiled: the memory guard refuses sizes whose
    whole-image decode would not fit."""

    encoder_part, decoder_part, samples_posterior = TINY_VAE_ENCODER, TINY_VAE_DECODER, False

    def __init__(
        self,
        engine: Callable[[str], Engine],
        scaling_factor: float = 1.0,
        channels: int = LATENT_CHANNELS,
        factor: int = 8,
    ):
        self._engine = engine
        self.scaling_factor = scaling_factor
        self.channels = channels
        self.factor = factor

    def decode_pixels(self, width: int, height: int) -> int:
        """Output pixels the decoder works on at once: the whole image."""
        return width * height

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents (N, 4, h, w) -> images (N, 8h, 8w, 3) in 0..1, one image at a time."""
        decoder = self._engine(self.decoder_part)
        images = [
            decoder.run({"latent_sample": (latents[i : i + 1] / self.scaling_factor).astype(np.float32)})["sample"]
            for i in range(len(latents))
        ]
        return _unit_images(np.concatenate(images).astype(np.float32))

    def encode_latents(self, pixels: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        """Images (N, 3, H, W) in -1..1 -> the U-Net's latents (``noise`` is not used: nothing is sampled)."""
        encoder = self._engine(self.encoder_part)
        latents = np.concatenate(
            [encoder.run({"sample": pixels[i : i + 1].astype(np.float32)})["latent_sample"] for i in range(len(pixels))]
        ).astype(np.float32)
        check_finite(latents, "the tiny VAE encoder")
        return latents * np.float32(self.scaling_factor)
