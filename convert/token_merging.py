"""Token merging for Stable Diffusion (ToMe; Bolya & Hoffman 2023, "Token Merging for Fast Stable Diffusion"),
baked into the exported U-Net.

Before each self-attention at the U-Net's full latent resolution (4096 tokens at 512x512, where the score
matrix and its softmax cost most of a CPU step), a fraction ``ratio`` of the tokens is merged into similar
ones, attention runs on what is left, and every merged token takes its partner's output back (the paper's
"unmerge", sec. 3). This is the paper's default setting (as in its reference code `tomesd`): merging only
for self-attention, only at the highest resolution, destination tokens on a 2x2 grid. Two choices differ:
- the destination of each 2x2 cell is always its top-left token (``tomesd``'s ``use_rand=False``), so that the
  exported graph is deterministic and needs no random input;
- the similarity is measured on the tokens the attention receives (after the block's layer norm) rather
  than on the block's input, because an attention processor sees only those; both are the same tokens up
  to a per-token affine map, and the paper measures cosine similarity.

The merge changes the image (as it does in every tool that offers it, e.g. AUTOMATIC1111's "Token merging
ratio"): it is a speed option with its fidelity reported by ``sdlite bench``, never a default.

Every index is computed from the tensors' shapes inside the graph, so the export stays valid at every image
size and batch.
"""

from __future__ import annotations

import torch

# A 2x2 cell has one destination token, so at most 3/4 of the tokens can be merged away.
MAX_RATIO = 0.75


def bipartite_merge(metric: torch.Tensor, height, width, ratio: float):
    """Plan a merge of ``metric``'s (batch, height * width, channels) tokens (ToMe, sec. 3.1, bipartite soft
    matching with 2x2 destination cells): returns ``(merge, unmerge)``.

    ``merge(x)`` maps (batch, tokens, c) to (batch, tokens - r, c), averaging each merged token into its most
    similar destination; ``unmerge(y)`` maps back, each merged token taking its destination's value.
    r = floor(tokens * ratio).
    """
    tokens = metric.shape[1]
    positions = torch.arange(tokens, device=metric.device)
    row, col = positions // width, positions % width
    cells_h, cells_w = height // 2, width // 2
    is_dst = (row % 2 == 0) & (col % 2 == 0) & (row < 2 * cells_h) & (col < 2 * cells_w)
    # Destinations first, then sources, each in raster order.
    order = torch.argsort(positions + tokens * (~is_dst).long())
    num_dst = cells_h * cells_w
    dst_pos, src_pos = order[:num_dst], order[num_dst:]
    # While the exporter traces, sizes are tensors: r stays a graph value, so the graph serves every size.
    merged = (tokens * ratio).floor().long() if isinstance(tokens, torch.Tensor) else int(tokens * ratio)

    with torch.no_grad():
        unit = metric / metric.norm(dim=-1, keepdim=True)
        similarity = unit[:, src_pos] @ unit[:, dst_pos].transpose(1, 2)  # (batch, src, dst) cosines
        best = similarity.amax(dim=-1, keepdim=True)
        # The first index of the maximum, by comparison: OpenVINO runs an ArgMax over the (batch, src, dst)
        # scores as a TopK at 10 ms a layer (SD 1.5, 512x512), the comparison and ReduceMin in under 3. Should
        # a runtime's rounding ever leave no score >= the maximum, the index is the last one (never out of range).
        columns = torch.arange(similarity.shape[-1], device=metric.device)
        partner = torch.where(similarity >= best, columns, similarity.shape[-1] - 1).amin(dim=-1)
        best = best.squeeze(-1)
        ranked = best.argsort(dim=-1, descending=True)  # the most similar sources merge
        kept_src, merged_src = ranked[:, merged:], ranked[:, :merged]
        merged_dst = partner.gather(1, merged_src)

    def merge(x: torch.Tensor) -> torch.Tensor:
        src, dst = x[:, src_pos], x[:, dst_pos]
        into = merged_dst.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        # Mean of each destination and the sources merged into it (the paper's average, sec. 3.1).
        total = dst.scatter_add(1, into, _pick(src, merged_src))
        ones = torch.ones_like(dst[..., :1])
        count = ones.scatter_add(1, merged_dst.unsqueeze(-1), torch.ones_like(merged_dst, dtype=x.dtype).unsqueeze(-1))
        return torch.cat([_pick(src, kept_src), total / count], dim=1)

    def unmerge(y: torch.Tensor) -> torch.Tensor:
        kept = y.shape[1] - num_dst
        unmerged, dst = y[:, :kept], y[:, kept:]
        # Sources in ``ranked`` order (merged ones first, each taking its destination's value), put back in
        # source order by the inverse permutation; then destinations and sources back in raster order.
        src = _pick(torch.cat([_pick(dst, merged_dst), unmerged], dim=1), _inverse(ranked))
        return torch.cat([dst, src], dim=1)[:, order.argsort()]

    return merge, unmerge


def _pick(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b, k]]`` for (batch, tokens, c) ``x`` and (batch, k) ``index``: one row gather over the
    flattened batch (a gather along the token axis would expand the index to (batch, k, c) first)."""
    batch, tokens, channels = x.shape
    rows = index + torch.arange(batch, device=x.device).unsqueeze(1) * tokens
    return x.reshape(-1, channels)[rows.reshape(-1)].reshape(batch, -1, channels)


def _inverse(permutation: torch.Tensor) -> torch.Tensor:
    """The inverse of each row of a (batch, n) permutation, by one scatter instead of a sort."""
    positions = torch.arange(permutation.shape[1], device=permutation.device).expand_as(permutation)
    return torch.empty_like(permutation).scatter(1, permutation, positions)


class TokenMergingAttnProcessor:
    """Wraps a self-attention processor: merge tokens, attend, unmerge (ToMe for SD, sec. 3.2)."""

    def __init__(self, inner, ratio: float, grid: dict):
        self.inner, self.ratio, self.grid = inner, ratio, grid

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        height, width = self.grid["size"]
        merge, unmerge = bipartite_merge(hidden_states, height, width, self.ratio)
        return unmerge(self.inner(attn, merge(hidden_states), None, attention_mask, temb, **kwargs))


def apply_token_merging(unet, ratio: float) -> int:
    """Merge ``ratio`` of the tokens before each self-attention at ``unet``'s full latent resolution (its first
    down block and last up block), on top of the attention processors it has; the number of layers changed."""
    if not 0 < ratio <= MAX_RATIO:
        raise ValueError(f"token merging ratio must be in (0, {MAX_RATIO}], got {ratio}")
    grid = getattr(unet, "_sdlite_latent_grid", None)
    if grid is None:
        # The processors need the latent grid's height and width, which only the U-Net's input has.
        grid = unet._sdlite_latent_grid = {}

        def remember_grid(module, args, kwargs):
            sample = args[0] if args else kwargs["sample"]
            grid["size"] = sample.shape[-2:]

        unet.register_forward_pre_hook(remember_grid, with_kwargs=True)
    changed = 0
    for block in (unet.down_blocks[0], unet.up_blocks[-1]):
        for transformer in getattr(block, "attentions", []):
            for layer in transformer.transformer_blocks:
                processor = layer.attn1.processor
                inner = processor.inner if isinstance(processor, TokenMergingAttnProcessor) else processor
                layer.attn1.set_processor(TokenMergingAttnProcessor(inner, ratio, grid))
                changed += 1
    return changed
