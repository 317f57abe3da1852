"""Checkpoints in the original Stable Diffusion layout (one A1111 / model-site file), converted offline.

Keys look like ``model.diffusion_model.input_blocks.0.0.weight`` (U-Net), ``first_stage_model.…`` (VAE)
and ``cond_stage_model.transformer.…`` (CLIP, SD 1.x) or ``cond_stage_model.model.…`` (OpenCLIP, SD 2.x).
diffusers' own ``from_single_file`` downloads a config from the hub for each part; here the configs ship
with sdlite (``configs/<family>.json``) and every size the tensors show (channel widths, depths, context
width, vocabulary, ...) is read from them, so toy models convert as well as real ones. The key renaming is
diffusers' public conversion functions (``diffusers.loaders.single_file_utils``) fed with those configs.

What the tensors cannot show (GroupNorm group count, attention heads, default image size) comes from the
family config; a file may override it with a JSON ``__metadata__`` entry ``sdlite.architecture``, e.g.
``{"unet": {"norm_num_groups": 8}, "text_encoder": {"num_attention_heads": 4}}``.
"""

from __future__ import annotations

import copy
import json
import re
import tempfile
from pathlib import Path

from sdlite.errors import InputError, summarize

CONFIG_DIR = Path(__file__).parent / "configs"
UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer."
OPEN_CLIP = "cond_stage_model.model."
METADATA_KEY = "sdlite.architecture"
# The cross-attention key whose second dimension is the text encoder's width (768 SD 1.x, 1024 SD 2.x).
_CONTEXT_KEY = UNET + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


def detect_family(state: dict, source: str) -> str:
    """``sd15`` or ``sd2`` from the keys and shapes; SDXL and non-SD files raise ``InputError``."""
    if any(key.startswith("conditioner.embedders.") for key in state):
        raise InputError(f"{source}: an SDXL checkpoint; SDXL is not supported yet (sdlite converts SD 1.x and 2.x)")
    if not any(key.startswith(UNET) for key in state):
        raise InputError(
            f"{source}: not a Stable Diffusion checkpoint (no {UNET} keys; a LoRA, VAE or other model? "
            "LoRAs go to --lora)"
        )
    context = state[_CONTEXT_KEY].shape[1] if _CONTEXT_KEY in state else None
    if any(key.startswith(OPEN_CLIP) for key in state) or context == 1024:
        return "sd2"
    if any(key.startswith(CLIP) for key in state):
        return "sd15"
    raise InputError(f"{source}: no text encoder weights ({CLIP} or {OPEN_CLIP}); cannot tell the model family")


def _family_config(family: str) -> dict:
    return json.loads((CONFIG_DIR / f"{family}.json").read_text())


def _numbered(state: dict, prefix: str) -> list[int]:
    """The sorted integers ``n`` for which some key starts with ``prefix + "n."``."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for key in state if (m := pattern.match(key))})


def _unet_dims(state: dict, source: str) -> dict:
    """U-Net sizes from the tensors: blocks, widths, layers per block, channels, context, projections."""
    groups: list[list[tuple[int, bool]]] = [[]]  # per down block: (out channels, has attention) per layer
    for i in _numbered(state, UNET + "input_blocks.")[1:]:
        block = f"{UNET}input_blocks.{i}."
        if block + "0.op.weight" in state:
            groups.append([])
        elif block + "0.out_layers.3.weight" in state:
            groups[-1].append((state[block + "0.out_layers.3.weight"].shape[0], block + "1.proj_in.weight" in state))
        else:
            raise InputError(f"{source}: unexpected U-Net layout at input_blocks.{i}")
    if not groups[0] or len({len(g) for g in groups}) != 1:
        raise InputError(f"{source}: unexpected U-Net layout (uneven down blocks)")
    widths = [g[0][0] for g in groups]
    attention = [g[0][1] for g in groups]
    dims = {
        "in_channels": state[UNET + "input_blocks.0.0.weight"].shape[1],
        "out_channels": state[UNET + "out.2.weight"].shape[0],
        "layers_per_block": len(groups[0]),
        "block_out_channels": widths,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
    }
    if _CONTEXT_KEY in state:
        dims["cross_attention_dim"] = state[_CONTEXT_KEY].shape[1]
    proj_in = next((v for k, v in state.items() if k.startswith(UNET) and k.endswith("proj_in.weight")), None)
    if proj_in is not None:
        # SD 2.x projects with linear layers, SD 1.x with 1x1 convolutions.
        dims["use_linear_projection"] = proj_in.ndim == 2
    return dims


def _vae_dims(state: dict) -> dict:
    blocks = _numbered(state, VAE + "encoder.down.")
    widths = [state[f"{VAE}encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in blocks]
    return {
        "in_channels": state[VAE + "encoder.conv_in.weight"].shape[1],
        "out_channels": state[VAE + "decoder.conv_out.weight"].shape[0],
        # The encoder predicts mean and log-variance: twice the latent channels.
        "latent_channels": state[VAE + "encoder.conv_out.weight"].shape[0] // 2,
        "block_out_channels": widths,
        "down_block_types": ["DownEncoderBlock2D"] * len(widths),
        "up_block_types": ["UpDecoderBlock2D"] * len(widths),
        "layers_per_block": len(_numbered(state, VAE + "encoder.down.0.block.")),
    }


def _clip_prefix(state: dict) -> str:
    # Old checkpoints (transformers < 4.x layout) lack the "text_model." level.
    return CLIP + ("text_model." if any(k.startswith(CLIP + "text_model.") for k in state) else "")


def _text_dims(state: dict, family: str) -> dict:
    if family == "sd2":
        vocab, hidden = state[OPEN_CLIP + "token_embedding.weight"].shape
        layers = len(_numbered(state, OPEN_CLIP + "transformer.resblocks."))
        dims = {
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": state[OPEN_CLIP + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            # SD 2.x conditions on the penultimate layer: the last block is left out.
            "num_hidden_layers": layers - 1,
            "max_position_embeddings": state[OPEN_CLIP + "positional_embedding"].shape[0],
        }
    else:
        prefix = _clip_prefix(state)
        vocab, hidden = state[prefix + "embeddings.token_embedding.weight"].shape
        dims = {
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": state[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0],
            "num_hidden_layers": len(_numbered(state, prefix + "encoder.layers.")),
            "max_position_embeddings": state[prefix + "embeddings.position_embedding.weight"].shape[0],
            "projection_dim": hidden,
        }
    # CLIP ViT-L and OpenCLIP ViT-H both use 64-wide attention heads.
    dims["num_attention_heads"] = max(1, hidden // 64)
    return dims


def _overrides(metadata: dict | None, source: str) -> dict:
    text = (metadata or {}).get(METADATA_KEY)
    if not text:
        return {}
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError:
        raise InputError(f"{source}: metadata {METADATA_KEY!r} is not valid JSON") from None
    if not isinstance(overrides, dict):
        raise InputError(f"{source}: metadata {METADATA_KEY!r} must be a JSON object")
    return overrides


def build_configs(state: dict, family: str, source: str, metadata: dict | None = None) -> dict:
    """The diffusers configs of every part: the family's shipped config, sizes from the tensors, overrides."""
    base = _family_config(family)
    configs = {
        "unet": {**base["unet"], **_unet_dims(state, source)},
        "vae": {**base["vae"], **_vae_dims(state)},
        "text_encoder": {**base["text_encoder"], **_text_dims(state, family)},
        "scheduler": dict(base["scheduler"]),
        "tokenizer_pad_token": base["tokenizer_pad_token"],
    }
    unet = configs["unet"]
    if base["unet_heads"]["rule"] == "head_dim":
        unet["attention_head_dim"] = [max(1, w // base["unet_heads"]["value"]) for w in unet["block_out_channels"]]
    else:
        unet["attention_head_dim"] = base["unet_heads"]["value"]
    for part, values in _overrides(metadata, source).items():
        if part not in configs or not isinstance(values, dict):
            raise InputError(f"{source}: metadata {METADATA_KEY!r} names unknown part {part!r}")
        configs[part].update(values)
    return configs


def _load_strict(module, weights: dict, part: str, source: str, ignore: tuple[str, ...] = ()) -> None:
    """Load converted weights; a missing or unexpected tensor means the layout was misread."""
    weights = {k: v.float() if v.is_floating_point() else v for k, v in weights.items() if not k.endswith(ignore)}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(weights) - {k for k in expected if k.endswith(ignore)})
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise InputError(
            f"{source}: {part} weights do not fit the detected architecture "
            f"({len(missing)} missing, {len(unexpected)} unexpected, e.g. {detail})"
        )
    wrong = [k for k, v in weights.items() if v.shape != expected[k].shape]
    if wrong:
        raise InputError(
            f"{source}: {part} tensor {wrong[0]!r} has shape {tuple(weights[wrong[0]].shape)}, "
            f"expected {tuple(expected[wrong[0]].shape)}"
        )
    module.load_state_dict(weights, strict=False)


def _text_encoder(state: dict, family: str, config: dict, source: str):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig(**config))
    if family == "sd2":
        last = len(_numbered(state, OPEN_CLIP + "transformer.resblocks.")) - 1
        # The last block is not used (penultimate-layer conditioning); its keys have no place in the model.
        kept = {k: v for k, v in state.items() if not k.startswith(f"{OPEN_CLIP}transformer.resblocks.{last}.")}
        weights = convert_open_clip_checkpoint(model, kept, prefix=OPEN_CLIP)
    else:
        weights = convert_ldm_clip_checkpoint({k: v for k, v in state.items() if k.startswith(CLIP)})
        weights = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in weights.items()}
    # diffusers' SD 2.x text encoder is a CLIPTextModel: the OpenCLIP output projection goes unused.
    _load_strict(model, weights, "text encoder", source, ignore=("position_ids", "text_projection.weight"))
    return model


def _prediction_type(unet, family: str, configured: str) -> str:
    """SD 2.x comes as 768-v (v-prediction) and 512-base (epsilon) with identical shapes.

    The test A1111 uses: at t=999 the latent is nearly pure noise, so an epsilon model's output is close
    to its input while a v model's (v = alpha * eps - sigma * x0 with alpha -> 0) is close to minus it.
    """
    if family != "sd2":
        return configured
    import torch

    with torch.no_grad():
        x = torch.ones(1, unet.config.in_channels, 8, 8) * 0.5
        context = torch.zeros(1, 77, unet.config.cross_attention_dim)
        out = unet(x, torch.tensor([999]), encoder_hidden_states=context).sample
    return "v_prediction" if (out - x).mean().item() < -1 else "epsilon"


def pipeline_from_ldm(state: dict, source: str, metadata: dict | None = None):
    """Build a float32 ``StableDiffusionPipeline`` from an original-layout state dict, without the hub."""
    import diffusers
    from diffusers import (
        AutoencoderKL,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTokenizer

    from sdlite.models.clip_vocab import write_clip_tokenizer

    family = detect_family(state, source)
    if not any(key.startswith(VAE) for key in state):
        raise InputError(f"{source}: no VAE weights ({VAE}…); this checkpoint was saved without its VAE")
    try:
        configs = build_configs(state, family, source, metadata)
    except KeyError as exc:
        raise InputError(f"{source}: incomplete checkpoint (no tensor {exc.args[0]!r})") from None

    try:
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
    except ValueError as exc:
        # Widths that the family's fixed hyperparameters do not fit (toy models): say how to describe them.
        raise InputError(
            f"{source}: its layer widths do not fit {family}'s defaults ({summarize(exc)}); "
            f"describe the architecture in the file's {METADATA_KEY!r} metadata"
        ) from None
    _load_strict(unet, convert_ldm_unet_checkpoint(state, configs["unet"]), "U-Net", source)
    vae_weights = convert_ldm_vae_checkpoint({k: v for k, v in state.items() if k.startswith(VAE)}, configs["vae"])
    _load_strict(vae, vae_weights, "VAE", source)
    text_encoder = _text_encoder(state, family, configs["text_encoder"], source)

    scheduler_config = copy.deepcopy(configs["scheduler"])
    scheduler_class = getattr(diffusers, scheduler_config.pop("_class_name"))
    scheduler_config["prediction_type"] = _prediction_type(unet, family, scheduler_config["prediction_type"])
    if family == "sd2" and scheduler_config["prediction_type"] == "epsilon":
        unet.register_to_config(sample_size=64)  # 2.x-base: 512 px
    with tempfile.TemporaryDirectory() as tok_dir:
        write_clip_tokenizer(tok_dir, pad_token=configs["tokenizer_pad_token"])
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    # 9 input channels: an inpainting U-Net (latents, mask, masked-image latents).
    pipeline_class = StableDiffusionInpaintPipeline if unet.config.in_channels == 9 else StableDiffusionPipeline
    return pipeline_class(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler_class.from_config(scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
