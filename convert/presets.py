"""Few-step model families and the generation defaults they need, detected at conversion or given by the user.

A few-step checkpoint (SD-Turbo, LCM, LCM-LoRA, SDXL-Lightning, Hyper-SD) is a regular U-Net distilled to run in
1-8 steps with a particular sampler and without classifier-free guidance; at SD's usual 20 steps and CFG 7.5 it
makes burnt images. The converter writes the family's defaults into the manifest, and the runtime uses them for
whatever the user does not give.
"""

from __future__ import annotations

from pathlib import Path

from sdlite.errors import InputError

# Steps, CFG, sampler and schedule each family is distilled for (their model cards' recommendations).
PRESETS: dict[str, dict[str, object]] = {
    # LCM-LoRA (Luo et al. 2023): LCM sampler, 4 steps, no guidance.
    "lcm": {"steps": 4, "cfg_scale": 1.0, "sampler": "LCM"},
    # SD-Turbo (adversarial diffusion distillation): 1 step, no guidance, timesteps from the last training step.
    "turbo": {"steps": 1, "cfg_scale": 1.0, "sampler": "Euler a", "schedule": "sgm_uniform"},
    # SDXL-Lightning / Hyper-SD: Euler on "trailing" timesteps, 4 steps, no guidance.
    "lightning": {"steps": 4, "cfg_scale": 1.0, "sampler": "Euler", "schedule": "sgm_uniform"},
}
# What a model family generates with when neither the user nor a few-step preset says: SDXL's CFG scale is
# diffusers' StableDiffusionXLPipeline default (SD's 7.5 over-saturates it); size comes from the U-Net's config.
FAMILY_DEFAULTS: dict[str, dict[str, object]] = {"sdxl": {"cfg_scale": 5.0}, "sdxl-refiner": {"cfg_scale": 5.0}}
# SDXL-Turbo was distilled at 512x512, half of SDXL's size (its model card); every other model keeps its U-Net's.
_SIZES = {("sdxl", "turbo"): 512}
# A latent consistency U-Net embeds the guidance scale; 8 is LCM-Dreamshaper's recommended scale.
LCM_EMBEDDED = {**PRESETS["lcm"], "cfg_scale": 8.0}
CHOICES = ("auto", "none", *PRESETS)


def model_defaults(preset: str, unet_config, name: str, lora_paths: list[Path]) -> tuple[str | None, dict]:
    """The few-step family (or None) and its defaults for a checkpoint.

    ``preset`` "auto" detects: a U-Net with a guidance embedding (``time_cond_proj_dim``) is an LCM, a LoRA whose
    file name says "lcm" makes one, and a checkpoint named "...turbo..." or "...lightning..." is that family;
    "none" writes no defaults; a family name is taken as given."""
    if preset not in CHOICES:
        raise InputError(f"--preset {preset}: unknown; known: {', '.join(CHOICES)}")
    embedded = bool(getattr(unet_config, "time_cond_proj_dim", None))
    if preset == "auto":
        words = name.lower()
        if embedded or any("lcm" in path.name.lower() for path in lora_paths):
            preset = "lcm"
        else:
            preset = next((family for family in ("turbo", "lightning") if family in words), "none")
    if preset == "none":
        return None, {}
    return preset, dict(LCM_EMBEDDED if preset == "lcm" and embedded else PRESETS[preset])


def default_side(family: str, preset: str | None, native: int) -> int:
    """The image side a model generates at by default: its U-Net's ``native`` one, unless its few-step family was
    distilled at another."""
    return _SIZES.get((family, preset or ""), native)
