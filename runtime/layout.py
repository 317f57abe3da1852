"""The converted-model folder: what ``sdlite convert`` writes and the runtime reads.

The layout is optimum's (``optimum-cli export onnx|openvino`` writes the same folders, which the runtime
opens too): one sub-folder per part holding its graph and ``config.json``, plus ``tokenizer/``,
``scheduler/scheduler_config.json`` and ``model_index.json``. sdlite adds ``sdlite.json`` (the manifest:
variants, hashes, validation; ``sdlite.manifest``). The converter and the runtime both take these names and
facts from here, so that they cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from sdlite.errors import InputError

MANIFEST_NAME = "sdlite.json"
MODEL_INDEX = "model_index.json"
CONFIG_NAME = "config.json"
TOKENIZER_DIR = "tokenizer"
# SDXL's second tokenizer (OpenCLIP's: the same vocabulary, padding with "!") and text encoder.
TOKENIZER_2_DIR = "tokenizer_2"
TEXT_ENCODER_2 = "text_encoder_2"
SCHEDULER_CONFIG = Path("scheduler") / "scheduler_config.json"

# The graphs converted from every checkpoint, and the ones a generation cannot do without. An SDXL base checkpoint
# adds a second text encoder; an SDXL refiner has only the second.
PARTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
FAMILY_PARTS = {
    "sdxl": ("text_encoder", TEXT_ENCODER_2, "unet", "vae_encoder", "vae_decoder"),
    "sdxl-refiner": (TEXT_ENCODER_2, "unet", "vae_encoder", "vae_decoder"),
}
# Converted when the checkpoint has one (diffusers' ONNX script and sdlite write the same inputs).
SAFETY_CHECKER = "safety_checker"
# A tiny autoencoder (TAESD, diffusers' AutoencoderTiny) converted beside the model's own VAE when asked for: it
# decodes in a small fraction of the VAE's time, for fast images and step previews. It works on the U-Net's
# latents as they are (its scaling factor is 1).
TINY_VAE_ENCODER, TINY_VAE_DECODER = "taesd_encoder", "taesd_decoder"
TINY_VAE_PARTS = (TINY_VAE_ENCODER, TINY_VAE_DECODER)

# Graph file of each format, and where its weights live: model.onnx keeps tensors over 2 GB (and sdlite's
# exports, all of them) in model.onnx_data beside it; openvino_model.xml keeps them in openvino_model.bin.
GRAPH_FILES = {"onnx": "model.onnx", "openvino": "openvino_model.xml"}
ONNX_EXTERNAL_DATA = "model.onnx_data"
# sdlite's text-encoder exports end before CLIP's final layer norm (so that one graph serves every clip skip);
# its weights (arrays weight, bias, eps) sit beside the graph in this file and the runtime applies it.
FINAL_NORM_FILE = "final_layer_norm.npz"

# What each part's graph takes and gives, by name, as sdlite and optimum export them (and as the runtime feeds
# and reads them): a graph of another part in a part's folder is recognised by these.
PART_INPUTS = {
    "text_encoder": ("input_ids",),
    TEXT_ENCODER_2: ("input_ids",),
    "unet": ("sample", "timestep", "encoder_hidden_states"),
    "vae_encoder": ("sample",),
    "vae_decoder": ("latent_sample",),
    SAFETY_CHECKER: ("clip_input", "images"),
    TINY_VAE_ENCODER: ("sample",),
    TINY_VAE_DECODER: ("latent_sample",),
}
# Inputs a part's graph takes only for some models: a latent consistency (LCM) U-Net's guidance-scale embedding,
# an SDXL U-Net's pooled text embedding and size/crop "time ids" (Podell et al. 2023, sec. 2.2).
OPTIONAL_INPUTS = {"unet": ("timestep_cond", "text_embeds", "time_ids")}
PART_OUTPUTS = {
    "text_encoder": ("last_hidden_state",),
    # CLIPTextModelWithProjection: the projected pooled embedding first, as optimum exports it.
    TEXT_ENCODER_2: ("text_embeds", "last_hidden_state"),
    "unet": ("out_sample",),
    "vae_encoder": ("latent_parameters",),
    "vae_decoder": ("sample",),
    SAFETY_CHECKER: ("has_nsfw_concepts",),
    TINY_VAE_ENCODER: ("latent_sample",),
    TINY_VAE_DECODER: ("sample",),
}


def check_part_graph(part: str, graph: Path, inputs: Sequence[str], outputs: Sequence[str]) -> None:
    """Raise a one-line InputError unless a graph with these input and output names can serve as ``part``."""
    wanted_in, wanted_out = PART_INPUTS.get(part), PART_OUTPUTS.get(part)
    if wanted_in is None:
        return
    optional = set(OPTIONAL_INPUTS.get(part, ()))
    if not set(wanted_in) <= set(inputs) <= set(wanted_in) | optional or not set(wanted_out) <= set(outputs):
        raise InputError(
            f"{graph}: not a {part} graph: it takes {', '.join(inputs) or 'nothing'} and gives "
            f"{', '.join(outputs) or 'nothing'}; a {part} takes {', '.join(wanted_in)} and gives "
            f"{', '.join(wanted_out)} (a graph of another part or model in this folder? convert again)"
        )


# SD's VAE latents are scaled to unit variance by this factor (Rombach et al. 2022, sec. 4.3.2); configs that
# predate the key use it.
DEFAULT_VAE_SCALING = 0.18215
# Latent channels of the KL VAE every SD 1.x/2.x checkpoint uses.
LATENT_CHANNELS = 4

# Text-encoder (= U-Net cross-attention) width -> family: SD 2.x conditions on OpenCLIP ViT-H (1024 wide), SD 1.x
# on CLIP ViT-L (768), and sdlite's toy models, narrower, follow SD 1.x's layout.
_SD2_WIDTH = 1024
SDXL_FAMILIES = ("sdxl", "sdxl-refiner")


def family_of(unet_config: dict, has_text_encoder: bool = True) -> str:
    """The family of a model from its U-Net's config: SDXL's U-Net conditions on pooled text and time ids
    ("text_time"); its refiner has no first text encoder. Otherwise SD 2.x or 1.x by cross-attention width."""
    if unet_config.get("addition_embed_type") == "text_time":
        return "sdxl" if has_text_encoder else "sdxl-refiner"
    return "sd2" if unet_config.get("cross_attention_dim") == _SD2_WIDTH else "sd15"


def sdxl_time_id_count(unet_config: Mapping, pooled_width: int) -> int:
    """Time ids an SDXL U-Net takes: its added embedding reads the pooled text embedding (``pooled_width``) and
    ``addition_time_embed_dim`` numbers per id: 6 for the base model (original size, crop top-left, target size),
    5 for the refiner (original size, crop top-left, aesthetic score)."""
    total, per_id = unet_config["projection_class_embeddings_input_dim"], unet_config["addition_time_embed_dim"]
    return (total - pooled_width) // per_id


def family_parts(family: str) -> tuple[str, ...]:
    """The graphs a model of ``family`` is converted to (without the optional safety checker and tiny VAE)."""
    return FAMILY_PARTS.get(family, PARTS)


def text_encoders(family: str) -> tuple[str, ...]:
    """The text-encoder parts of ``family``, in the order their hidden states are concatenated."""
    return tuple(part for part in family_parts(family) if part.startswith("text_encoder"))


def required_parts(family: str) -> tuple[str, ...]:
    """The graphs a text-to-image generation of ``family`` cannot do without."""
    return (*text_encoders(family), "unet", "vae_decoder")


def vae_factor(block_out_channels: Sequence[int]) -> int:
    """Pixels per latent cell along each side: the VAE halves the size between its blocks (8 for every SD VAE)."""
    return 2 ** (len(block_out_channels) - 1)


def graph_files(graph: Path) -> list[Path]:
    """A graph file and the weight file that belongs to it, where that exists."""
    graph = Path(graph)
    weights = graph.with_suffix(".bin") if graph.suffix == ".xml" else graph.parent / ONNX_EXTERNAL_DATA
    return [graph, weights] if weights.is_file() else [graph]
