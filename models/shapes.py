"""The ``shapes`` recipe: a small Stable Diffusion model that sdlite trains itself, on CPU, from a seed.

Architecture is SD 1.5's (CLIPTextModel with the real BPE vocabulary, UNet2DConditionModel with
cross-attention, 4-block AutoencoderKL with downsampling factor 8, DDIM scheduler, epsilon prediction)
at toy width, so it goes through the same converters and runtime as any SD 1.5 checkpoint.

Training, on images from :mod:`sdlite.models.shapes_data` (held-out colour pairs never shown):

* stage A: the VAE, as an autoencoder (L1 + MSE reconstruction, weighted up at colour edges; tiny
  KL); the latent scaling factor is then measured (1 / std of the latents) and stored in the VAE config, as SD does;
* stage B: U-Net and text encoder together from scratch on the frozen VAE's latents (8x8x4 for 64x64
  images) with the standard epsilon objective (min-SNR weighted), 10% empty captions so that
  classifier-free guidance works, AdamW, warm-up + cosine LR, EMA weights.

``python -m sdlite.models shapes --train OUT`` runs it (about 40 minutes on 2 CPU cores) and writes a
diffusers folder plus ``loss_curve.png`` and ``training.json``; ``sdlite convert OUT models/default``
turns it into the embedded default model. Needs the convert extra (torch is imported lazily).
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sdlite.convert.atomic import atomic_output_dir
from sdlite.models.clip_vocab import write_clip_tokenizer
from sdlite.models.shapes_data import IMAGE_SIZE, samples, to_array


@dataclass(frozen=True)
class ShapesConfig:
    """Widths and training budget of the shapes model (defaults: the shipped model)."""

    vae_channels: tuple[int, ...] = (16, 32, 32, 32)
    vae_steps: int = 2500
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    vae_edge_weight: float = 2.0  # extra loss weight on pixels next to a colour edge
    unet_channels: tuple[int, ...] = (48, 96, 96)
    unet_heads: int = 8
    unet_groups: int = 16
    text_hidden: int = 32
    text_ffn: int = 128
    text_layers: int = 3
    text_heads: int = 4
    latents_dataset: int = 12288  # distinct training images, encoded once by the frozen VAE
    unet_steps: int = 5000
    unet_batch: int = 48
    unet_lr: float = 8e-4
    warmup: int = 200
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    threads: int = 2


def _models(cfg: ShapesConfig):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(
        block_out_channels=cfg.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=IMAGE_SIZE,
    )
    n = len(cfg.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 8,
        block_out_channels=cfg.unet_channels,
        # SD 1.5's block pattern (cross-attention everywhere but the lowest resolution), one level fewer:
        # the latents are only 8x8.
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        layers_per_block=1,
        attention_head_dim=cfg.unet_heads,
        norm_num_groups=cfg.unet_groups,
        cross_attention_dim=cfg.text_hidden,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=cfg.text_hidden,
            intermediate_size=cfg.text_ffn,
            num_hidden_layers=cfg.text_layers,
            num_attention_heads=cfg.text_heads,
            max_position_embeddings=77,
            projection_dim=cfg.text_hidden,
            hidden_act="quick_gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=1,
        )
    )
    return vae, unet, text_encoder


def _edge_weights(x, extra: float):
    """Per-pixel loss weights: 1 + ``extra`` within one pixel of a colour edge of ``x`` (N, C, H, W).

    Shapes are flat colours, so almost every pixel is trivially reconstructed; the outline is what a
    blurry decoder gets wrong, and the outline is what tells a triangle from a circle.
    """
    import torch.nn.functional as F

    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().sum(1, keepdim=True)
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().sum(1, keepdim=True)
    edges = F.pad(dx, (0, 1)) + F.pad(dx, (1, 0)) + F.pad(dy, (0, 0, 0, 1)) + F.pad(dy, (0, 0, 1, 0))
    return 1.0 + extra * (F.max_pool2d(edges, 3, 1, 1) > 0).float()


def _lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def draw_loss_curve(curves: dict[str, list[float]], path: Path, width: int = 640, height: int = 300) -> None:
    """Plot loss curves (log scale, smoothed) side by side with Pillow; matplotlib is not a dependency."""
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    panel_w = width // max(1, len(curves))
    for i, (name, values) in enumerate(curves.items()):
        x0, pad = i * panel_w, 36
        left, top, right, bottom = x0 + pad, 24, x0 + panel_w - 10, height - 24
        draw.rectangle((left, top, right, bottom), outline="black")
        draw.text((left, 6), name, fill="black")
        if len(values) < 2:
            continue
        v = np.log10(np.maximum(np.asarray(values, dtype=np.float64), 1e-8))
        k = max(1, len(v) // 50)  # moving average over ~2% of the run
        smooth = np.convolve(v, np.ones(k) / k, mode="valid")
        lo, hi = float(smooth.min()), float(smooth.max())
        hi = hi if hi > lo else lo + 1
        draw.text((x0 + 2, top), f"{10**hi:.3g}", fill="black")
        draw.text((x0 + 2, bottom - 10), f"{10**lo:.3g}", fill="black")
        draw.text((right - 60, bottom + 6), f"{len(values)} steps", fill="black")
        pts = [
            (left + (right - left) * j / (len(smooth) - 1), bottom - (bottom - top) * (s - lo) / (hi - lo))
            for j, s in enumerate(smooth)
        ]
        draw.line(pts, fill=(30, 80, 200), width=2)
    img.save(path)


def train(out: str | Path, seed: int = 0, cfg: ShapesConfig | None = None, progress: bool = True) -> Path:
    """Train the shapes model from scratch and save it as a diffusers folder at ``out`` (atomically)."""
    import torch
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
    from tqdm import tqdm
    from transformers import CLIPTokenizer

    from sdlite.models.recipes import SD15_SCHEDULER

    cfg = cfg or ShapesConfig()
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out}: output folder already exists; choose a new path or remove it")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    vae, unet, text_encoder = _models(cfg)
    curves: dict[str, list[float]] = {"VAE reconstruction": [], "U-Net epsilon (min-SNR weighted)": []}
    timings: dict[str, float] = {}

    # Stage A: the VAE.
    data = samples(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    vae.train()
    for step in tqdm(range(cfg.vae_steps), desc="VAE", unit="step", disable=not progress):
        for group in opt.param_groups:
            group["lr"] = cfg.vae_lr * _lr_factor(step, cfg.vae_steps, 50)
        x = torch.from_numpy(to_array([next(data)[0] for _ in range(cfg.vae_batch)]))
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        err = (recon - x).abs()
        rec = (_edge_weights(x, cfg.vae_edge_weight) * (err + err**2)).mean()
        loss = rec + cfg.vae_kl_weight * dist.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        curves["VAE reconstruction"].append(float(rec.detach()))
    vae.eval().requires_grad_(False)
    timings["vae_s"] = time.perf_counter() - started

    # Encode a fixed training set once; each step samples from the latent distributions (mean, std).
    tok_dir = tempfile.mkdtemp(prefix="sdlite-shapes-tok-")
    write_clip_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    data = samples(seed + 1)
    means, stds, captions = [], [], []
    with torch.no_grad():
        for _ in tqdm(range(cfg.latents_dataset // 256), desc="encode", unit="batch", disable=not progress):
            batch = [next(data) for _ in range(256)]
            dist = vae.encode(torch.from_numpy(to_array([b[0] for b in batch]))).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
            # Four caption variants per image (size / position words left out or not), picked per step.
            for b in batch:
                captions.append([b[2].caption(s, p) for s in (True, False) for p in (True, False)])
    means_t, stds_t = torch.cat(means), torch.cat(stds)
    sample = means_t + stds_t * torch.randn(means_t.shape, generator=gen)
    scaling = float(1.0 / sample.std())
    vae.register_to_config(scaling_factor=scaling)
    variants = sorted({c for cs in captions for c in cs} | {""})
    ids_of = {c: i for i, c in enumerate(variants)}
    all_ids = tokenizer(variants, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    caption_idx = torch.tensor([[ids_of[c] for c in cs] for cs in captions])
    empty = ids_of[""]
    timings["encode_s"] = time.perf_counter() - started - timings["vae_s"]

    # Stage B: U-Net + text encoder.
    noise_sched = DDPMScheduler.from_config({**SD15_SCHEDULER, "clip_sample": False})
    alphas = noise_sched.alphas_cumprod.float()
    snr = alphas / (1 - alphas)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.0)
    unet.train()
    text_encoder.train()
    n = len(means_t)
    bar = tqdm(range(cfg.unet_steps), desc="U-Net", unit="step", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cfg.unet_lr * _lr_factor(step, cfg.unet_steps, cfg.warmup)
        idx = torch.randint(0, n, (cfg.unet_batch,), generator=gen)
        z0 = (means_t[idx] + stds_t[idx] * torch.randn(means_t[idx].shape, generator=gen)) * scaling
        variant = torch.randint(0, 4, (cfg.unet_batch,), generator=gen)
        cap = caption_idx[idx, variant]
        drop = torch.rand(cfg.unet_batch, generator=gen) < cfg.caption_dropout
        cap = torch.where(drop, torch.full_like(cap, empty), cap)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.unet_batch,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        zt = noise_sched.add_noise(z0, noise, t)
        hidden = text_encoder(all_ids[cap])[0]
        pred = unet(zt, t, hidden).sample
        weight = torch.clamp(snr[t], max=cfg.min_snr_gamma) / snr[t]
        loss = (weight * ((pred - noise) ** 2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        curves["U-Net epsilon (min-SNR weighted)"].append(float(loss.detach()))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(curves['U-Net epsilon (min-SNR weighted)'][-50:]):.4f}")
    with torch.no_grad():
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)
    unet.eval()
    text_encoder.eval()
    timings["unet_s"] = time.perf_counter() - started - timings["vae_s"] - timings["encode_s"]
    timings["total_s"] = time.perf_counter() - started

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        # PLMS (PNDM) extrapolates the small model's noise estimates into garbage (diffusers' own PNDM too:
        # 17% shape colour against DDIM's 71% on the same prompts); DDIM with SD 1.5's betas is robust.
        scheduler=DDIMScheduler.from_config(SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    with atomic_output_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        draw_loss_curve(curves, tmp / "loss_curve.png")
        record = {
            "seed": seed,
            "config": asdict(cfg),
            "vae_scaling_factor": scaling,
            "timings_s": {k: round(v, 1) for k, v in timings.items()},
            "final_loss": {k: float(np.mean(v[-100:])) for k, v in curves.items()},
            "torch_threads": torch.get_num_threads(),
        }
        (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    return out
