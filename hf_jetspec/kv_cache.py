"""Step 4 of a round, the cache: each row keeps its committed prefix plus its accepted tree slots, the rest dropped or
marked invalid; gaps (and the head's invalid context rows) are squeezed out now and then."""

from __future__ import annotations

import torch
from transformers import DynamicCache


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


def keep_accepted(cache: DynamicCache, past_length: int,
                  accepted: list[list[int]]) -> tuple[torch.LongTensor, torch.BoolTensor]:
    """Step 4 of a round: each row keeps its root and its accepted nodes (`accepted[i]`, node indices in order) in the
    cache's new slots, the rest of its `max_kept` slots marked invalid. Returns the kept tree nodes per slot
    `(rows, max_kept)` and which slots are valid (one row never has invalid ones)."""
    kept = [1 + len(path) for path in accepted]
    device = cache.layers[0].keys.device
    index = torch.zeros(len(accepted), max(kept), dtype=torch.long, device=device)
    for i, path in enumerate(accepted):
        index[i, 1 : kept[i]] = torch.tensor(path, dtype=torch.long)
    keep_tree_slots(cache, past_length, index)
    valid = torch.arange(index.shape[1], device=device)[None] < torch.tensor(kept, device=device)[:, None]
    return index, valid
