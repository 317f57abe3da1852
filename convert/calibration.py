"""Calibration data for int8 activations: the U-Net's real inputs while the model generates real prompts.

Quantization ranges fitted to random noise misjudge the activations a U-Net sees in use, so
the converter runs the PyTorch pipeline on a few everyday prompts and records every U-Net call.
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
