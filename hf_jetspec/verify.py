"""Step 2 of a round, verify: one target forward over every tree node (ancestor mask, tree positions), its cost
measured with the same forward, and the tapped hidden states the head reads next."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from .attention import TREE_ATTENTION, packed_tree_mask, verification_attention
from .compat import cache_kwarg
from .masks import sliding_window, verify_attention_mask
from .packed_linear import PackedLinears, packed_linears


TREE_MASK_ATTENTION = ("sdpa", "eager", "jetspec_tree")


def verify_tree(decoder, tree, past_length: int, cache: DynamicCache, hidden_state_ids: list[int], dtype: torch.dtype,
                packed: PackedLinears | None = None):
    """Step 2 of a round: one target forward over every tree node (ancestor mask, tree positions), appending the
    nodes' keys and values to `cache` and returning the decoder outputs with the tapped hidden states. Under
    `attn_implementation="jetspec_tree"` the mask is the packed ancestor bits (no dense mask, see `attention.py`).
    `packed`: the decoder's [`PackedLinears`] (see `packed_linear.py`), if any."""
    if decoder.config._attn_implementation == TREE_ATTENTION:
        attention_mask = packed_tree_mask(tree.packed_ancestor_bits())
    elif sliding_window(decoder.config) is None:
        attention_mask = tree.attention_mask(past_length, dtype)
    else:  # the window on top of the ancestor mask, for the sliding-window layers (see masks.py)
        device = tree.tokens.device
        allowed = torch.cat([torch.ones(tree.num_nodes, past_length, dtype=torch.bool, device=device),
                             tree.ancestor_mask], dim=1)[None]
        query_positions = tree.position_ids(past_length)
        key_positions = torch.cat([torch.arange(past_length, device=device)[None], query_positions], dim=1)
        attention_mask = verify_attention_mask(decoder.config, allowed, query_positions, key_positions, dtype)
    return verify_forward(decoder, packed, input_ids=tree.tokens[None], position_ids=tree.position_ids(past_length),
                          attention_mask=attention_mask, output_hidden_states=hidden_state_ids,
                          **{cache_kwarg(decoder.forward): cache})


def verify_forward(decoder, packed: PackedLinears | None, input_ids: torch.LongTensor, **kwargs):
    """One verify forward of the target's decoder (cache on), as every verify forward and its cost calibration runs:
    grouped-query heads folded (`attention.verification_attention`) and linears on `packed` weights where measured
    faster (`packed_linear.py`)."""
    with verification_attention(decoder), packed_linears(packed, input_ids.numel()):
        return decoder(input_ids=input_ids, use_cache=True, **kwargs)


def tap_features(hidden_states: tuple[torch.Tensor | None, ...], target_layer_ids: list[int]) -> torch.Tensor:
    """Concatenates the outputs of the tapped target layers: `(batch, seq, K * hidden)`.

    `hidden_states` is a Transformers `hidden_states` tuple (index `i + 1` holds layer `i`'s output; entries not
    asked for may be `None`). The taps go to the device of the deepest one, nearest the `lm_head` and the head when
    the target is split over devices (`device_map`).
    """
    device = hidden_states[max(target_layer_ids) + 1].device
    return torch.cat([hidden_states[i + 1].to(device) for i in target_layer_ids], dim=-1)
