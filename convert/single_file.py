"""Checkpoints in the original Stable Diffusion layout (one A1111 / model-site file), converted offline.

Keys look like ``model.diffusion_model.input_blocks.0.0.weight`` (U-Net), ``first_stage_model.…`` (VAE) and, for
the text encoders, ``cond_stage_model.transformer.…`` (CLIP, SD 1.x), ``cond_stage_model.model.…`` (OpenCLIP,
SD 2.x) or ``conditioner.embedders.N.…`` (SDXL: OpenAI CLIP ViT-L then OpenCLIP ViT-bigG; the refiner has only
the second). diffusers' own ``from_single_file`` downloads a config from the hub for each part; here the configs
ship with sdlite (``configs/<family>.json``) and every size the tensors show (channel widths, depths, context
width, vocabulary, time-id embedding width, ...) is read from them, so toy models convert as well as real ones.
The key renaming is diffusers' public conversion functions (``diffusers.loaders.single_file_utils``) fed with
those configs.

What the tensors cannot show (GroupNorm group count, attention heads, default image size) comes from the
family config; a file may override it with a JSON ``__metadata__`` entry ``sdlite.architecture``, e.g.
``{"unet": {"norm_num_groups": 8}, "text_encoder": {"num_attention_heads": 4}}``.

The checkpoint is unpacked into a float32 diffusers folder one part at a time, reading only that part's tensors,
and the converter loads that folder memory-mapped like any other: the peak is the largest part in float32
(SDXL's U-Net, 10 GB), not the whole checkpoint next to its float32 copy.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from sdlite.errors import InputError, summarize

CONFIG_DIR = Path(__file__).parent / "configs"
UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer."
OPEN_CLIP = "cond_stage_model.model."
SDXL_CLIP = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP = "conditioner.embedders.1.model."
REFINER_OPEN_CLIP = "conditioner.embedders.0.model."
METADATA_KEY = "sdlite.architecture"
# Any cross-attention key: its second dimension is the text conditioning's width (768 SD 1.x, 1024 SD 2.x,
# 2048 SDXL base, 1280 refiner).
_CONTEXT_KEY = re.compile(re.escape(UNET) + r"input_blocks\.\d+\.1\.transformer_blocks\.0\.attn2\.to_k\.weight")
# Markers that model sites' v-prediction SDXL checkpoints carry (an empty tensor each), as ComfyUI reads them.
_V_PREDICTION_KEY, _ZERO_SNR_KEY = "v_pred", "ztsnr"


@dataclass(frozen=True)
class _TextEncoder:
    """Where one text encoder's weights are and how they map onto transformers' CLIP models."""

    part: str
    prefix: str
    open_clip: bool
    # SDXL's second encoder: a CLIPTextModelWithProjection (the pooled embedding goes to the U-Net).
    projection: bool = False
    # SD 2.x conditions on the penultimate layer: the last block is left out of the model.
    drop_last_block: bool = False

    @property
    def tokenizer(self) -> str:
        return self.part.replace("text_encoder", "tokenizer")


TEXT_ENCODERS: dict[str, tuple[_TextEncoder, ...]] = {
    "sd15": (_TextEncoder("text_encoder", CLIP, open_clip=False),),
    "sd2": (_TextEncoder("text_encoder", OPEN_CLIP, open_clip=True, drop_last_block=True),),
    "sdxl": (
        _TextEncoder("text_encoder", SDXL_CLIP, open_clip=False),
        _TextEncoder("text_encoder_2", SDXL_OPEN_CLIP, open_clip=True, projection=True),
    ),
    "sdxl-refiner": (_TextEncoder("text_encoder_2", REFINER_OPEN_CLIP, open_clip=True, projection=True),),
}
# Added time ids per SDXL U-Net (original size, crop, target size; the refiner an aesthetic score instead).
_TIME_IDS = {"sdxl": 6, "sdxl-refiner": 5}


def _has_prefix(state: Mapping, prefix: str) -> bool:
    return any(key.startswith(prefix) for key in state)


def detect_family(state: Mapping, source: str) -> str:
    """``sd15``, ``sd2``, ``sdxl`` or ``sdxl-refiner`` from the keys and shapes; other files raise ``InputError``."""
    if not _has_prefix(state, UNET):
        raise InputError(
            f"{source}: not a Stable Diffusion checkpoint (no {UNET} keys; a LoRA, VAE or other model? "
            "LoRAs go to --lora)"
        )
    if _has_prefix(state, "conditioner.embedders."):
        if _has_prefix(state, SDXL_OPEN_CLIP) and _has_prefix(state, SDXL_CLIP):
            return "sdxl"
        if _has_prefix(state, REFINER_OPEN_CLIP) and not _has_prefix(state, "conditioner.embedders.1."):
            return "sdxl-refiner"
        raise InputError(
            f"{source}: SDXL-style text encoders sdlite does not know (expected {SDXL_CLIP}… with "
            f"{SDXL_OPEN_CLIP}…, or only {REFINER_OPEN_CLIP}… for the refiner)"
        )
    context = _context_width(state)
    if _has_prefix(state, OPEN_CLIP) or context == 1024:
        return "sd2"
    if _has_prefix(state, CLIP):
        return "sd15"
    raise InputError(f"{source}: no text encoder weights ({CLIP} or {OPEN_CLIP}); cannot tell the model family")


def _context_width(state: Mapping) -> int | None:
    key = next((key for key in state if _CONTEXT_KEY.fullmatch(key)), None)
    return state[key].shape[1] if key else None


def _family_config(family: str) -> dict:
    # The refiner's differences from SDXL base all show in its tensors, except the pipeline's flags.
    return json.loads((CONFIG_DIR / f"{family.removesuffix('-refiner')}.json").read_text())


def _numbered(state: Mapping, prefix: str) -> list[int]:
    """The sorted integers ``n`` for which some key starts with ``prefix + "n."``."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for key in state if (m := pattern.match(key))})


def _unet_dims(state: Mapping, source: str) -> dict:
    """U-Net sizes from the tensors: blocks, widths, layers and transformer depth per block, channels, context,
    projections, the added-embedding width."""
    groups: list[list[tuple[int, int]]] = [[]]  # per down block: (out channels, transformer blocks) per layer
    for i in _numbered(state, UNET + "input_blocks.")[1:]:
        block = f"{UNET}input_blocks.{i}."
        if block + "0.op.weight" in state:
            groups.append([])
        elif block + "0.out_layers.3.weight" in state:
            depth = len(_numbered(state, block + "1.transformer_blocks."))
            groups[-1].append((state[block + "0.out_layers.3.weight"].shape[0], depth))
        else:
            raise InputError(f"{source}: unexpected U-Net layout at input_blocks.{i}")
    if not groups[0] or len({len(g) for g in groups}) != 1:
        raise InputError(f"{source}: unexpected U-Net layout (uneven down blocks)")
    widths = [g[0][0] for g in groups]
    depths = [g[0][1] for g in groups]
    dims = {
        "in_channels": state[UNET + "input_blocks.0.0.weight"].shape[1],
        "out_channels": state[UNET + "out.2.weight"].shape[0],
        "layers_per_block": len(groups[0]),
        "block_out_channels": widths,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depths)],
        # One block where a level has none: diffusers' value for levels without attention.
        "transformer_layers_per_block": [max(d, 1) for d in depths],
    }
    context = _context_width(state)
    if context is not None:
        dims["cross_attention_dim"] = context
    proj_in = next((key for key in state if key.startswith(UNET) and key.endswith("proj_in.weight")), None)
    if proj_in is not None:
        # SD 2.x and SDXL project with linear layers, SD 1.x with 1x1 convolutions.
        dims["use_linear_projection"] = state[proj_in].ndim == 2
    if UNET + "label_emb.0.0.weight" in state:
        dims["projection_class_embeddings_input_dim"] = state[UNET + "label_emb.0.0.weight"].shape[1]
    return dims


def _vae_dims(state: Mapping) -> dict:
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


def _clip_prefix(state: Mapping, prefix: str) -> str:
    # Old checkpoints (transformers < 4.x layout) lack the "text_model." level.
    return prefix + ("text_model." if _has_prefix(state, prefix + "text_model.") else "")


def _text_dims(state: Mapping, encoder: _TextEncoder) -> dict:
    if encoder.open_clip:
        prefix = encoder.prefix
        vocab, hidden = state[prefix + "token_embedding.weight"].shape
        layers = len(_numbered(state, prefix + "transformer.resblocks."))
        dims = {
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": state[prefix + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
            "num_hidden_layers": layers - int(encoder.drop_last_block),
            "max_position_embeddings": state[prefix + "positional_embedding"].shape[0],
        }
        if encoder.projection:
            dims["projection_dim"] = state[prefix + "text_projection"].shape[1]
    else:
        prefix = _clip_prefix(state, encoder.prefix)
        vocab, hidden = state[prefix + "embeddings.token_embedding.weight"].shape
        dims = {
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": state[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0],
            "num_hidden_layers": len(_numbered(state, prefix + "encoder.layers.")),
            "max_position_embeddings": state[prefix + "embeddings.position_embedding.weight"].shape[0],
            "projection_dim": hidden,
        }
    # CLIP ViT-L, OpenCLIP ViT-H and ViT-bigG all use 64-wide attention heads.
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


def build_configs(state: Mapping, family: str, source: str, metadata: dict | None = None) -> dict:
    """The diffusers configs of every part: the family's shipped config, sizes from the tensors, overrides."""
    base = _family_config(family)
    configs = {
        "unet": {**base["unet"], **_unet_dims(state, source)},
        "vae": {**base["vae"], **_vae_dims(state)},
        "scheduler": dict(base["scheduler"]),
    }
    for encoder in TEXT_ENCODERS[family]:
        configs[encoder.part] = {**base[encoder.part], **_text_dims(state, encoder)}
    unet = configs["unet"]
    if base["unet_heads"]["rule"] == "head_dim":
        unet["attention_head_dim"] = [max(1, w // base["unet_heads"]["value"]) for w in unet["block_out_channels"]]
    else:
        unet["attention_head_dim"] = base["unet_heads"]["value"]
    if family in _TIME_IDS:
        # The added embedding takes the pooled text embedding and each time id's sinusoidal embedding.
        time_ids = unet["projection_class_embeddings_input_dim"] - configs["text_encoder_2"]["projection_dim"]
        if time_ids <= 0 or time_ids % _TIME_IDS[family]:
            raise InputError(
                f"{source}: the U-Net's added embedding takes {unet['projection_class_embeddings_input_dim']} "
                f"values, which is not the pooled text width plus {_TIME_IDS[family]} time-id embeddings"
            )
        unet["addition_time_embed_dim"] = time_ids // _TIME_IDS[family]
    else:
        del unet["transformer_layers_per_block"]
    for part, values in _overrides(metadata, source).items():
        if part not in configs or not isinstance(values, dict):
            raise InputError(f"{source}: metadata {METADATA_KEY!r} names unknown part {part!r}")
        configs[part].update(values)
    return configs


def _check_weights(expected: dict, weights: dict, part: str, source: str) -> None:
    """A missing or unexpected tensor, or a wrong shape, means the layout was misread: one line saying which."""
    missing = sorted(set(expected) - set(weights))
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


def _float_part(state: Mapping, prefix: str, skip: Callable[[str], bool] = lambda key: False) -> dict:
    """Float32 copies of the tensors under ``prefix``, read one at a time (a half-precision file's tensor is
    released as soon as it is widened)."""
    import torch

    def widened(tensor):
        return tensor.to(torch.float32, copy=True) if tensor.is_floating_point() else tensor

    return {key: widened(state[key]) for key in state if key.startswith(prefix) and not skip(key)}


def _skeleton(make: Callable, family: str, source: str):
    """The part's module without memory (meta tensors): its keys and shapes to check the weights against."""
    import torch

    try:
        with torch.device("meta"):
            return make()
    except ValueError as exc:
        # Widths that the family's fixed hyperparameters do not fit (toy models): say how to describe them.
        raise InputError(
            f"{source}: its layer widths do not fit {family}'s defaults ({summarize(exc)}); "
            f"describe the architecture in the file's {METADATA_KEY!r} metadata"
        ) from None


def _materialize(module, weights: dict, part: str, source: str, ignore: tuple[str, ...] = ()):
    """``module`` (a skeleton) holding ``weights`` (no copy), after checking them against its layout."""
    weights = {k: v for k, v in weights.items() if not k.endswith(ignore)}
    expected = {k: v for k, v in module.state_dict().items() if not k.endswith(ignore)}
    _check_weights(expected, weights, part, source)
    module.load_state_dict(weights, strict=False, assign=True)
    return module


def _save_weights(weights: dict, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, path, metadata={"format": "pt"})


def _write_diffusers_part(module, weights: dict, folder: Path):
    """Write a diffusers model's config and ``weights`` into ``folder`` as ``save_pretrained`` lays them out;
    return the module emptied (on the meta device), enough to describe the pipeline."""
    module.save_config(folder)
    _save_weights(weights, folder / "diffusion_pytorch_model.safetensors")
    return module.to("meta")


def _text_encoder(state: Mapping, family: str, encoder: _TextEncoder, config: dict, source: str):
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    model_class = CLIPTextModelWithProjection if encoder.projection else CLIPTextModel
    model = _skeleton(lambda: model_class(CLIPTextConfig(**config)), family, source)
    if encoder.open_clip:
        last = f"{encoder.prefix}transformer.resblocks.{config['num_hidden_layers']}."
        # The unused last block of SD 2.x has no place in the model.
        kept = _float_part(state, encoder.prefix, lambda key: encoder.drop_last_block and key.startswith(last))
        weights = convert_open_clip_checkpoint(model, kept, prefix=encoder.prefix)
    else:
        weights = convert_ldm_clip_checkpoint(_float_part(state, encoder.prefix), remove_prefix=encoder.prefix)
        weights = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in weights.items()}
    # A CLIPTextModel (SD 1.x/2.x) has no output projection: OpenCLIP's goes unused.
    ignore = ("position_ids",) if encoder.projection else ("position_ids", "text_projection.weight")
    return _materialize(model, weights, encoder.part.replace("_", " "), source, ignore)


def _prediction_type(unet, family: str, configured: str, state: Mapping) -> str:
    """SD 2.x comes as 768-v (v-prediction) and 512-base (epsilon) with identical shapes.

    The test A1111 uses: at t=999 the latent is nearly pure noise, so an epsilon model's output is close
    to its input while a v model's (v = alpha * eps - sigma * x0 with alpha -> 0) is close to minus it.
    SDXL v-prediction checkpoints say so with a ``v_pred`` key instead.
    """
    if family in _TIME_IDS:
        return "v_prediction" if _V_PREDICTION_KEY in state else configured
    if family != "sd2":
        return configured
    import torch

    with torch.no_grad():
        x = torch.ones(1, unet.config.in_channels, 8, 8) * 0.5
        context = torch.zeros(1, 77, unet.config.cross_attention_dim)
        out = unet(x, torch.tensor([999]), encoder_hidden_states=context).sample
    return "v_prediction" if (out - x).mean().item() < -1 else "epsilon"


def _pipeline_class(family: str, in_channels: int):
    import diffusers

    # 9 input channels: an inpainting U-Net (latents, mask, masked-image latents).
    inpaint = in_channels == 9
    if family == "sdxl-refiner":
        return diffusers.StableDiffusionXLImg2ImgPipeline
    if family == "sdxl":
        return diffusers.StableDiffusionXLInpaintPipeline if inpaint else diffusers.StableDiffusionXLPipeline
    return diffusers.StableDiffusionInpaintPipeline if inpaint else diffusers.StableDiffusionPipeline


def unpack_ldm(state: Mapping, source: str, folder: Path, metadata: dict | None = None, quiet: bool = False) -> str:
    """Write the original-layout checkpoint ``state`` as a float32 diffusers folder at ``folder``, without the
    hub, one part at a time (a progress bar unless ``quiet``); return its family. ``state`` may read its tensors
    lazily (see ``checkpoint_file.open_state_dict``): only one part's are held at once."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from tqdm.auto import tqdm
    from transformers import CLIPTokenizer

    from sdlite.models.clip_vocab import write_clip_tokenizer

    family = detect_family(state, source)
    if not _has_prefix(state, VAE):
        raise InputError(f"{source}: no VAE weights ({VAE}…); this checkpoint was saved without its VAE")
    try:
        configs = build_configs(state, family, source, metadata)
    except KeyError as exc:
        raise InputError(f"{source}: incomplete checkpoint (no tensor {exc.args[0]!r})") from None
    base = _family_config(family)
    scheduler_config = copy.deepcopy(configs["scheduler"])
    scheduler_class = getattr(diffusers, scheduler_config.pop("_class_name"))
    # The refiner's pipeline takes a first text encoder too: None.
    components: dict = {"text_encoder": None, "tokenizer": None}
    bar = tqdm(total=2 + len(TEXT_ENCODERS[family]), desc=f"unpack {Path(source).name}", unit="part", disable=quiet)

    unet = _skeleton(lambda: UNet2DConditionModel(**configs["unet"]), family, source)
    weights = convert_ldm_unet_checkpoint(_float_part(state, UNET), configs["unet"])
    unet = _materialize(unet, weights, "U-Net", source)
    scheduler_config["prediction_type"] = _prediction_type(unet, family, scheduler_config["prediction_type"], state)
    if family == "sd2" and scheduler_config["prediction_type"] == "epsilon":
        unet.register_to_config(sample_size=64)  # 2.x-base: 512 px
    if _ZERO_SNR_KEY in state:
        scheduler_config["rescale_betas_zero_snr"] = True
    components["unet"] = _write_diffusers_part(unet, weights, folder / "unet")
    del weights
    bar.update()

    vae = _skeleton(lambda: AutoencoderKL(**configs["vae"]), family, source)
    weights = convert_ldm_vae_checkpoint(_float_part(state, VAE), configs["vae"])
    vae = _materialize(vae, weights, "VAE", source)
    components["vae"] = _write_diffusers_part(vae, weights, folder / "vae")
    del weights
    bar.update()

    for encoder in TEXT_ENCODERS[family]:
        model = _text_encoder(state, family, encoder, configs[encoder.part], source)
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(folder / encoder.part)
        _save_weights(model.state_dict(), folder / encoder.part / "model.safetensors")
        write_clip_tokenizer(folder / encoder.tokenizer, pad_token=base[encoder.tokenizer + "_pad_token"])
        components[encoder.part] = model.to("meta")
        components[encoder.tokenizer] = CLIPTokenizer.from_pretrained(folder / encoder.tokenizer)
        bar.update()
    bar.close()

    scheduler = scheduler_class.from_config(scheduler_config)
    scheduler.save_pretrained(folder / "scheduler")
    components["scheduler"] = scheduler
    pipeline_class = _pipeline_class(family, configs["unet"]["in_channels"])
    if family in _TIME_IDS:
        flags = {"add_watermarker": False, **base["pipeline"][family]}
    else:
        flags = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    # The pipeline's own config (model_index.json) names each component's class; its modules hold no memory.
    pipeline_class(**components, **flags).save_config(folder)
    return family
