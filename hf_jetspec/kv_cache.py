"""Step 4 of a round, the cache: keep the committed prefix plus the accepted tree rows, drop the rest (one prompt, a
batch's per-row tree slots, the head's context rows)."""

from __future__ import annotations

import torch
from transformers import DynamicCache


def compact_cache(cache: DynamicCache, past_length: int, keep: torch.LongTensor) -> None:
    """Keeps `past_length` prefix rows plus the tree rows `keep` (sorted, relative to the tree) in every layer.

    The kept rows are moved down in place; the rest is dropped with the public `crop(-n)`.
    """
    for layer in cache.layers:
        tree_rows = layer.keys.shape[-2] - past_length
        if keep.numel() < tree_rows:
            source = past_length + keep
            target = slice(past_length, past_length + keep.numel())
            layer.keys[:, :, target] = layer.keys[:, :, source]
            layer.values[:, :, target] = layer.values[:, :, source]
    cache.crop(-(cache.layers[0].keys.shape[-2] - past_length - keep.numel()))


def keep_tree_slots(cache: DynamicCache, past_length: int, index: torch.LongTensor) -> None:
    """After a verify forward that appended `n` tree slots per row, keeps `index.shape[1]` of them: row `i`'s slot
    `j` becomes tree node `index[i, j]`. The kept slots are written in place and the rest cropped."""
    width = index.shape[1]
    tree_rows = cache.layers[0].keys.shape[-2] - past_length
    # Every row keeping its first slots in order (e.g. roots alone: nothing accepted) needs no move, only the crop.
    in_place = bool((index == torch.arange(width, device=index.device)).all())
    if not in_place:
        for layer in cache.layers:
            gather = index[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
            layer.keys[:, :, past_length : past_length + width] = layer.keys[:, :, past_length:].gather(2, gather)
            layer.values[:, :, past_length : past_length + width] = layer.values[:, :, past_length:].gather(2, gather)
    if tree_rows > width:
        cache.crop(-(tree_rows - width))


def compact_cache_rows(cache, valid: torch.BoolTensor) -> torch.BoolTensor:
    """Squeezes the invalid slots out of every layer of a batched cache (slot order does not matter to attention: the
    positions are in the rotated keys, visibility in the mask). Returns the new validity mask `(batch, max_valid)`."""
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
    width = int(valid.sum(1).max())
    order = order[:, :width]
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        index = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
        layer.keys = layer.keys.gather(2, index)
        layer.values = layer.values.gather(2, index)
    return valid.gather(1, order)
