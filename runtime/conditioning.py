"""Prompts to the U-Net's ``encoder_hidden_states``, as AUTOMATIC1111 computes them.

Each prompt becomes 77-token chunks (``sdlite.prompts``); all chunks of all prompts go through the text
encoder as one batch; "clip skip" picks an earlier layer's hidden state; emphasis weights are applied per
chunk; each prompt's chunks are concatenated along the token axis. Prompts with fewer chunks than the
longest are padded with the empty prompt's chunk, so that the unconditional and conditional contexts of
classifier-free guidance have the same length and run as one U-Net batch. A textual-inversion embedding
named in a prompt takes token positions whose ids address rows the engine appended to the text encoder's
token table (``sdlite.embeddings``), so its vectors go through the same encoder, emphasis and clip skip.

Clip skip N (A1111's "Clip skip", ``CLIP_stop_at_last_layers``): N = 1 is the text encoder's output; N > 1
takes the hidden state N - 1 layers before the last and passes it through the encoder's final LayerNorm,
as A1111 does. SDXL conditions on the penultimate layer as it is, without the final LayerNorm (Podell et al.
2023, sec. 2.1): there clip skip N takes the hidden state N layers before the last (diffusers' ``clip_skip``
N - 1), so the default of 1 is the penultimate layer. SDXL's pooled embedding (the second encoder's
``text_embeds``) is each prompt's first chunk's, as A1111 takes it.

The exported graph gives every layer's hidden state (outputs ``hidden_states.0`` .. ``hidden_states.L``,
optimum's names), but the final LayerNorm is applied inside the graph only to the last layer; its weights sit
next to the graph in ``FINAL_NORM_FILE`` and numpy applies it. A separate graph, or one normed output per layer,
would cost an export for a 2 x width affine map.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from sdlite.embeddings import Embedding, EmbeddingLibrary
from sdlite.errors import InputError
from sdlite.layout import FINAL_NORM_FILE
from sdlite.loras import strip_extra_networks
from sdlite.prompts import Chunk, prompt_chunks
from sdlite.token_table import TokenRows
from sdlite.tokenizer import CLIPTokenizer

__all__ = ["TextConditioner", "apply_emphasis", "check_clip_skip", "layer_norm"]

_HIDDEN_PREFIX = "hidden_states."


def apply_emphasis(hidden: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """A1111's "Original" emphasis on one chunk: scale token ``i``'s hidden state by ``weights[i]``, then
    rescale so that the mean of the whole chunk is what it was. ``hidden`` is (77, width), ``weights`` (77,)."""
    weights = np.asarray(weights, dtype=np.float32)
    if np.all(weights == 1.0):
        return hidden  # the rescale would be x * (m / m): skipped, so plain prompts stay bit-exact
    original_mean = hidden.mean(dtype=np.float32)
    weighted = hidden * weights[:, None]
    return (weighted * (original_mean / weighted.mean(dtype=np.float32))).astype(np.float32)


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    """LayerNorm over the last axis (Ba et al. 2016), as ``torch.nn.LayerNorm`` computes it (biased variance)."""
    x = x.astype(np.float32)
    mean = x.mean(axis=-1, keepdims=True)
    var = np.square(x - mean).mean(axis=-1, keepdims=True)
    return ((x - mean) / np.sqrt(var + np.float32(eps)) * weight + bias).astype(np.float32)


class TextConditioner:
    """Builds chunks with ``tokenizer`` and turns the outputs of the text encoder at ``graph`` into context."""

    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        graph: Path,
        embeddings: EmbeddingLibrary | None = None,
        penultimate: bool = False,
    ):
        self.tokenizer = tokenizer
        self.graph = graph
        self.embeddings = embeddings
        # SDXL's layer choice: hidden states counted from the penultimate, never normalised.
        self.penultimate = penultimate
        comma = tokenizer.tokenize(",")
        self._comma = comma[0] if len(comma) == 1 else None
        self._norm: dict[str, np.ndarray] | None = None

    def chunks(self, prompt: str, used: dict[str, Embedding] | None = None) -> list[Chunk]:
        """``prompt``'s chunks (at least one). Textual-inversion embeddings named in it are added to
        ``used`` (name -> embedding, in the order they appear) when given."""
        tok = self.tokenizer
        library = self.embeddings

        def embedding_at(tokens: Sequence[int], position: int) -> tuple[tuple[int, ...], int] | None:
            found = library.find(tokens, position)
            if found is None:
                return None
            name, embedding, name_tokens = found
            if used is not None:
                used.setdefault(name, embedding)
            return embedding.ids, name_tokens

        return prompt_chunks(
            strip_extra_networks(prompt),
            tok.tokenize if library is None else lambda text: library.tokenize(text, tok.tokenize),
            tok.bos_token_id,
            tok.eos_token_id,
            tok.pad_token_id,
            self._comma,
            chunk_tokens=tok.model_max_length - 2,
            embedding_at=embedding_at if library is not None else None,
        )

    @property
    def graph_edit(self) -> TokenRows | None:
        """What the text encoder's loaded graph needs for the prompts to use the embeddings: their vectors as
        new rows of its token table (``sdlite.token_table``); None without embeddings."""
        if self.embeddings is None:
            return None
        rows = self.embeddings.rows
        return TokenRows(self.embeddings.first_id, rows) if rows.size else None

    def embeddings_used(self, prompts: list[str]) -> dict[str, Embedding]:
        """The textual-inversion embeddings ``prompts`` name, by the name written, in order of appearance."""
        used: dict[str, Embedding] = {}
        if self.embeddings is not None:
            for prompt in prompts:
                self.chunks(prompt, used)
        return used

    def encode(
        self, prompts: list[str], run: Callable[[np.ndarray], dict[str, np.ndarray]], clip_skip: int = 1
    ) -> np.ndarray:
        """Context for each prompt, (len(prompts), 77 * chunks, width); ``run`` runs the text encoder on
        input ids (batch, 77) and returns its outputs by name."""
        return self.encode_pooled(prompts, run, clip_skip)[0]

    def encode_pooled(
        self,
        prompts: list[str],
        run: Callable[[np.ndarray], dict[str, np.ndarray]],
        clip_skip: int = 1,
        pooled_output: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`encode`'s context, and the encoder's output ``pooled_output`` for each prompt's first chunk
        (len(prompts), width) when named (None otherwise)."""
        check_clip_skip(clip_skip)
        per_prompt = [self.chunks(prompt) for prompt in prompts]
        count = max(len(chunks) for chunks in per_prompt)
        empty = self.chunks("")[0]
        rows = [chunk for chunks in per_prompt for chunk in chunks + [empty] * (count - len(chunks))]
        ids = np.array([chunk.ids for chunk in rows], dtype=np.int64)
        outputs = run(ids)
        hidden = self._layer(outputs, clip_skip)  # (prompts * chunks, 77, width)
        hidden = np.stack([apply_emphasis(h, chunk.weights) for h, chunk in zip(hidden, rows, strict=True)])
        context = hidden.reshape(len(prompts), count * ids.shape[1], hidden.shape[-1]).astype(np.float32)
        pooled = None
        if pooled_output is not None:
            pooled = np.asarray(outputs[pooled_output], dtype=np.float32)[::count].copy()
        return context, pooled

    def _layer(self, outputs: dict[str, np.ndarray], clip_skip: int) -> np.ndarray:
        """The hidden state clip skip selects: the output for 1, else layer -clip_skip after the final norm
        (SDXL: layer -(clip_skip + 1) as it is)."""
        if clip_skip == 1 and not self.penultimate:
            return outputs["last_hidden_state"].astype(np.float32)
        indices = [int(name[len(_HIDDEN_PREFIX) :]) for name in outputs if name.startswith(_HIDDEN_PREFIX)]
        if not indices:
            raise InputError(
                f"clip skip {clip_skip}: the text encoder {self.graph} has no hidden_states outputs; "
                "convert the model with `sdlite convert` to use clip skip, or use clip skip 1"
            )
        layers = max(indices)  # hidden_states.0 is the embeddings, hidden_states.L the last layer
        if clip_skip > layers:
            raise InputError(f"clip skip {clip_skip}: the text encoder has {layers} layers; use 1 to {layers}")
        if self.penultimate:
            # transformers' hidden_states[-(clip_skip + 1)] of L + 1 states.
            return outputs[f"{_HIDDEN_PREFIX}{layers - clip_skip}"].astype(np.float32)
        # transformers' hidden_states[-clip_skip] of L + 1 states.
        hidden = outputs[f"{_HIDDEN_PREFIX}{layers + 1 - clip_skip}"]
        norm = self._final_norm()
        return layer_norm(hidden, norm["weight"], norm["bias"], float(norm["eps"]))

    def _final_norm(self) -> dict[str, np.ndarray]:
        if self._norm is None:
            path = self.graph.parent / FINAL_NORM_FILE
            if not path.is_file():
                raise InputError(
                    f"clip skip needs the text encoder's final layer norm in {path}, which `sdlite convert` "
                    "writes; convert the model with sdlite, or use clip skip 1"
                )
            with np.load(path, allow_pickle=False) as data:
                self._norm = {key: np.asarray(data[key]) for key in ("weight", "bias", "eps")}
        return self._norm


def check_clip_skip(clip_skip: int) -> None:
    """Clip skip counts layers from the last: 1 (the output) or more."""
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, (int, np.integer)) or clip_skip < 1:
        raise InputError(f"clip skip {clip_skip!r}: must be a whole number of at least 1 (1 = last layer)")
