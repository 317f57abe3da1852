"""Calibration data for int8 activations: the U-Net's real inputs while the model generates real prompts, and the
tiny VAE decoder's latents of images.

Quantization ranges fitted to random noise misjudge the activations a U-Net sees in use, so
the converter runs the PyTorch pipeline on a few everyday prompts and records every U-Net call. The tiny decoder
is calibrated on what its own encoder makes of synthetic images with the ingredients of photographs.
"""

from __future__ import annotations

import numpy as np

CALIBRATION_PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "a red circle on a blue background",
    "a watercolor painting of a lighthouse at dusk",
    "portrait of an old man, detailed, studio lighting",
)
CALIBRATION_STEPS = 5
# Calibration images are at most 64x64 latent cells (512x512 for SD's VAE): NNCF's statistics run holds each
# sample's quantizer inputs, which grow with the latent area (at SDXL's 128x128 cells, four times 512x512's).
# SDXL's ranges are then fitted at 512x512, the size SDXL-Turbo runs at; at 1024x1024 the same layers see
# larger activation maps.
CALIBRATION_MAX_CELLS = 64


def calibration_cells(sample_size: int) -> int:
    """The latent side of the calibration images for a U-Net of native ``sample_size`` latent cells."""
    return min(sample_size, CALIBRATION_MAX_CELLS)


def calibration_inputs(pipe, quiet: bool = True) -> list[dict[str, np.ndarray]]:
    """Run ``pipe`` (diffusers, PyTorch) on the calibration prompts and return every U-Net input it saw,
    named as the exported U-Net's inputs."""
    import torch

    side = calibration_cells(pipe.unet.config.sample_size) * pipe.vae_scale_factor

    records: list[dict[str, np.ndarray]] = []

    def record(module, args, kwargs):
        sample, timestep, context = args[0], args[1], kwargs["encoder_hidden_states"]
        # One record per image of the guidance batch (unconditional, conditional): the statistics see the
        # same activations, and NNCF's float32 statistics run holds half the activations at a time (SD 1.5
        # U-Net at 512x512: 9.0 -> 7.0 GB peak).
        for index in range(sample.shape[0]):
            records.append(
                {
                    "sample": sample[index : index + 1].detach().numpy().copy(),
                    "timestep": np.asarray(float(timestep.reshape(-1)[0]), dtype=np.float32),
                    "encoder_hidden_states": context[index : index + 1].detach().numpy().copy(),
                    # An SDXL U-Net's pooled text embedding and time ids.
                    **{
                        name: value[index : index + 1].detach().numpy().copy()
                        for name, value in (kwargs.get("added_cond_kwargs") or {}).items()
                    },
                }
            )

    handle = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    pipe.set_progress_bar_config(disable=quiet)
    try:
        for index, prompt in enumerate(CALIBRATION_PROMPTS):
            pipe(
                prompt,
                num_inference_steps=CALIBRATION_STEPS,
                height=side,
                width=side,
                generator=torch.Generator().manual_seed(index),
                output_type="latent",
            )
    finally:
        handle.remove()
    return records


# Synthetic images for the tiny decoder's calibration: enough to cover flat areas, gradients, edges and texture.
TINY_DECODER_IMAGES = 8


def synthetic_images(count: int, side: int, seed: int = 0) -> np.ndarray:
    """``count`` deterministic images (N, 3, side, side) in -1..1: smooth colour fields (a few random colours
    interpolated across the image), hard-edged discs and boxes in other colours, and grain of a different
    strength in each."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    images = []
    for index in range(count):
        cells = rng.integers(2, 6)
        field = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
        image = Image.fromarray(field).resize((side, side), Image.BICUBIC)
        draw = ImageDraw.Draw(image)
        for _ in range(rng.integers(1, 6)):
            x0, y0 = rng.integers(0, side, 2)
            extent = rng.integers(side // 16, side // 2)
            box = (int(x0), int(y0), int(x0 + extent), int(y0 + extent))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        pixels = np.asarray(image, np.float32) / 127.5 - 1
        pixels += rng.normal(0, 0.25 * index / count, pixels.shape).astype(np.float32)
        images.append(np.clip(pixels, -1, 1).transpose(2, 0, 1))
    return np.stack(images)


def tiny_decoder_inputs(vae, side: int) -> list[dict[str, np.ndarray]]:
    """Calibration samples of a tiny VAE's decoder (diffusers ``AutoencoderTiny``): its encoder's latents of
    ``synthetic_images`` at ``side`` x ``side`` pixels, one per sample, named as the exported decoder's input."""
    import torch

    samples = []
    with torch.no_grad():
        for image in synthetic_images(TINY_DECODER_IMAGES, side):
            latents = vae.encode(torch.from_numpy(image[None]), return_dict=False)[0]
            samples.append({"latent_sample": latents.numpy().copy()})
    return samples
