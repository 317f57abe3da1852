"""Requests that real AUTOMATIC1111 clients send, as their published source builds them.

- SillyTavern: ``src/endpoints/stable-diffusion.js`` (the server side that calls A1111) and
  ``public/scripts/extensions/stable-diffusion/index.js`` (``generateAutoImage``, which builds the txt2img body).
  It sends ``Authorization: Basic base64(auth)`` on every call, even when auth is empty; passes its own
  ``url`` and ``auth`` fields along in the body; reads ``images[0]``.
- Open WebUI: ``backend/open_webui/routers/images.py`` (the "automatic1111" engine). It switches models by
  posting back the whole options object with ``sd_model_checkpoint`` replaced; reads ``images`` and ``info``.
- text-generation-webui: ``extensions/sd_api_pictures/script.py``. It sends ``hr_scale`` as the string "1.0"
  and numbers as floats; posts ``""`` to unload-checkpoint / reload-checkpoint.
"""

from __future__ import annotations

import base64


def basic(auth: str) -> dict[str, str]:
    """The Authorization header SillyTavern and Open WebUI build from an ``user:password`` setting."""
    return {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()}


def sillytavern_txt2img(prompt: str, seed: int, auth: str) -> dict:
    """SillyTavern's txt2img body (generateAutoImage), its defaults, with the fields the server route adds."""
    return {
        "url": "http://127.0.0.1:7860",
        "auth": auth,
        "prompt": prompt,
        "negative_prompt": "lowres, bad anatomy",
        "sampler_name": "DDIM",
        "scheduler": "normal",
        "steps": 8,
        "cfg_scale": 7,
        "width": 64,
        "height": 64,
        "restore_faces": False,
        "enable_hr": False,
        "hr_upscaler": "Latent",
        "hr_scale": 2.0,
        "hr_additional_modules": [],
        "denoising_strength": 0.7,
        "hr_second_pass_steps": 0,
        "seed": seed,
        "override_settings": {"CLIP_stop_at_last_layers": 1},
        "override_settings_restore_afterwards": True,
        "clip_skip": 1,
        "save_images": True,
        "send_images": True,
        "do_not_save_grid": False,
        "do_not_save_samples": False,
    }


SILLYTAVERN_CONNECT = [
    "/sdapi/v1/options",
    "/sdapi/v1/samplers",
    "/sdapi/v1/schedulers",
    "/sdapi/v1/upscalers",
    "/sdapi/v1/latent-upscale-modes",
    "/sdapi/v1/sd-vae",
    "/sdapi/v1/sd-models",
]


def open_webui_txt2img(prompt: str) -> dict:
    """Open WebUI's txt2img body: n, size and steps from its image settings, then AUTOMATIC1111_PARAMS merged."""
    return {
        "prompt": prompt,
        "batch_size": 2,
        "width": 64,
        "height": 64,
        "steps": 8,
        "negative_prompt": "blurry",
        "cfg_scale": 7.0,
        "sampler_name": "Euler a",
        "scheduler": "Karras",
    }


def tgw_txt2img(prompt: str) -> dict:
    """text-generation-webui's sd_api_pictures body with its defaults (hr_scale a string, numbers as floats)."""
    return {
        "prompt": prompt,
        "seed": -1.0,
        "sampler_name": "DPM++ 2M",
        "enable_hr": False,
        "hr_scale": "1.0",
        "hr_upscaler": "ESRGAN_4x",
        "denoising_strength": 0.61,
        "steps": 8.0,
        "cfg_scale": 7.0,
        "width": 64.0,
        "height": 64.0,
        "restore_faces": False,
        "override_settings_restore_afterwards": True,
        "negative_prompt": "(worst quality, low quality:1.3)",
    }
