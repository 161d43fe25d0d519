"""Step 4 of a round, the cache: each row keeps its committed prefix plus its accepted tree slots, the rest dropped or
marked invalid; gaps (and the head's invalid context rows) are squeezed out now and then."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from .compat import cache_kwarg


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


def valid_first(valid: torch.BoolTensor) -> torch.LongTensor:
    """Per row, the indices of its valid entries (dim 1) in order, then its invalid ones, cut to the longest row's
    valid count: the gather index that squeezes the gaps out."""
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices
    return order[:, : int(valid.sum(1).max()) if valid.numel() else 0]


def compact_cache_rows(cache, valid: torch.BoolTensor) -> torch.BoolTensor:
    """Squeezes the invalid slots out of every layer of a batched cache (slot order does not matter to attention: the
    positions are in the rotated keys, visibility in the mask). Returns the new validity mask `(batch, max_valid)`."""
    order = valid_first(valid)
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        index = order[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[-1])
        layer.keys = layer.keys.gather(2, index)
        layer.values = layer.values.gather(2, index)
    return valid.gather(1, order)


def squeeze_gaps(cache, valid: torch.BoolTensor, min_gap: int, min_fraction: float) -> torch.BoolTensor:
    """[`compact_cache_rows`] once the invalid slots are at least `min_gap` per row and `min_fraction` of the cache
    (squeezing costs a copy of the cache); returns the validity mask, new or as it was."""
    width = valid.shape[1]
    gap = width - int(valid.sum(1).max()) if width else 0
    if gap and gap >= max(min_gap, min_fraction * width):
        return compact_cache_rows(cache, valid)
    return valid


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


class LeavingRows:
    """Each row's committed keys and values, kept as it leaves the batch, for the cache a batch call returns: the
    cache plain generate() would return for the same output (see [`LeavingRows.returned_cache`]).

    Args:
        batch_size (`int`): rows in the call.
    """

    def __init__(self, batch_size: int):
        self.parts: list[list[tuple[torch.Tensor, torch.Tensor]] | None] = [None] * batch_size

    def keep(self, cache: DynamicCache, key_valid: torch.BoolTensor, active: list[int], staying: list[int]) -> None:
        """Keeps the valid slots of every active row not in `staying` (positions in the batch); `active` maps batch
        positions to the call's rows."""
        for i, row in enumerate(active):
            if i not in staying:
                valid = key_valid[i]
                self.parts[row] = [(layer.keys[i][:, valid], layer.values[i][:, valid]) for layer in cache.layers]

    @torch.no_grad()
    def returned_cache(self, cache: DynamicCache, decoder, output: torch.LongTensor, prompt_mask: torch.LongTensor,
                       lengths: list[int]) -> DynamicCache:
        """`cache`, rebuilt to what plain generate() returns with `output`: one slot per output position but the last,
        so that a follow-up call reads it with `cat([attention_mask, ones])` as it would plain decoding's.

        A row's slot `j` holds its committed token `j`; its left padding slots hold zeros (masked); the slots past its
        last committed token (its last token, then the padding after an EOS) are computed by one forward over those
        output tokens, as plain decoding computed them (attending to every earlier non-padding slot).
        """
        width = output.shape[1] - 1
        padding = (prompt_mask.shape[1] - prompt_mask.sum(-1)).tolist()
        committed = [min(length - 1, width) for length in lengths]  # a row's cached tokens end here
        start = min(committed)  # the forward recomputes every row's slots from here on
        for index, layer in enumerate(cache.layers):
            keys, values = (torch.zeros(len(self.parts), *layer.keys.shape[1:2], start, layer.keys.shape[-1],
                                        dtype=layer.keys.dtype, device=layer.keys.device) for _ in range(2))
            for row, part in enumerate(self.parts):
                row_keys, row_values = part[index]
                keys[row, :, padding[row] :] = row_keys[:, : start - padding[row]]
                values[row, :, padding[row] :] = row_values[:, : start - padding[row]]
            layer.keys, layer.values = keys, values
        if start < width:
            mask = torch.cat([prompt_mask, prompt_mask.new_ones(output.shape[0], width - prompt_mask.shape[1])], dim=1)
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
            decoder(input_ids=output[:, start:width], attention_mask=mask, position_ids=positions[:, start:width],
                    use_cache=True, **{cache_kwarg(decoder.forward): cache})
        return cache
