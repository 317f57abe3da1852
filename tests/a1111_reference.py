"""A1111's prompt conditioning written out with the PyTorch text encoder: the reference for the runtime's."""

from __future__ import annotations

import numpy as np


def encode_chunks(tokenizer, model, rows: list[list[tuple[int, float]]], clip_skip: int = 1) -> np.ndarray:
    """Encode each chunk of (token id, weight) pairs as A1111 does: BOS + tokens + EOS padded to 77, the
    text encoder's output (or, for clip skip N, hidden_states[-N] through the final LayerNorm), each token's
    hidden state scaled by its weight, then the chunk's original mean restored; chunks concatenated."""
    import torch

    outputs = []
    for row in rows:
        ids = [tokenizer.bos_token_id, *[t for t, _ in row], tokenizer.eos_token_id]
        ids += [tokenizer.pad_token_id] * (77 - len(ids))
        weights = torch.tensor([1.0, *[w for _, w in row], *[1.0] * (76 - len(row))])
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_hidden_states=True)
            z = out.last_hidden_state[0]
            if clip_skip > 1:
                z = model.text_model.final_layer_norm(out.hidden_states[-clip_skip][0])
        mean = z.mean()
        z = z * weights[:, None]
        z = z * (mean / z.mean())
        outputs.append(z.numpy())
    return np.concatenate(outputs)[None]
