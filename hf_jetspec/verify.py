"""Step 2 of a round, verify: one target forward over every row's tree (ancestor masks, tree positions), and the tapped
hidden states the head reads next. The cost calibrations time the same forward."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from .attention import TREE_ATTENTION, packed_tree_mask, verification_attention
from .compat import cache_kwarg
from .masks import additive_mask, sliding_window, verify_attention_mask
from .packed_linear import PackedLinears, packed_linears


# Attention that takes a tree mask. A batch's dense per-row masks (left padding, cache gaps) take `"jetspec_tree"`'s
# SDPA path; one row over an all-valid cache takes its kernel (the packed ancestor bits).
TREE_MASK_ATTENTION = ("sdpa", "eager", "jetspec_tree")


def verify_round(decoder, trees, root_position_ids: torch.LongTensor, key_valid: torch.BoolTensor, cache: DynamicCache,
                 hidden_state_ids: list[int], dtype: torch.dtype, packed: PackedLinears | None = None,
                 pad_token_id: int = 0):
    """Step 2 of a round: one target forward over every row's tree, appending the nodes' keys and values to `cache`
    (`n` slots per row, trees padded to the largest) and returning the decoder outputs with the tapped hidden states.

    One row whose cache slots are all valid (no left padding, no gaps) takes [`verify_tree`]: its tree mask, or the
    packed ancestor bits under `attn_implementation="jetspec_tree"`. Otherwise every row gets a dense mask over its
    valid cache slots and its tree ([`batch_tree_inputs`]).

    Args:
        trees (`list[DraftTree]`): one per row.
        root_position_ids (`torch.LongTensor` of shape `(rows,)`): each root's position.
        key_valid (`torch.BoolTensor` of shape `(rows, cache_length)`): the cache slots each row may attend to.
    """
    if len(trees) == 1 and bool(key_valid.all()):
        return verify_tree(decoder, trees[0], key_valid.shape[1], cache, hidden_state_ids, dtype, packed)
    tree_ids, tree_positions, tree_mask = batch_tree_inputs(trees, root_position_ids, key_valid, pad_token_id, dtype,
                                                            decoder.config)
    return verify_forward(decoder, packed, input_ids=tree_ids, position_ids=tree_positions, attention_mask=tree_mask,
                          output_hidden_states=hidden_state_ids, **{cache_kwarg(decoder.forward): cache})


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


def batch_tree_inputs(
    trees: list[DraftTree],
    root_position_ids: torch.LongTensor,
    key_valid: torch.BoolTensor,
    pad_token_id: int,
    dtype: torch.dtype,
    config=None,
) -> tuple[torch.LongTensor, torch.LongTensor, torch.Tensor | dict[str, torch.Tensor]]:
    """Inputs of one batched verify forward, trees padded to the largest.

    Args:
        trees (`list[DraftTree]`): one per row.
        root_position_ids (`torch.LongTensor` of shape `(batch,)`): each root's position.
        key_valid (`torch.BoolTensor` of shape `(batch, cache_length)`): cache slots each row may attend to.
        pad_token_id (`int`): token of padding nodes.
        dtype (`torch.dtype`): dtype of the additive mask.
        config (`PretrainedConfig`, *optional*): the target's config; with sliding-window layers the mask is a dict
            per layer type, the window applied (see `masks.py`; a row's valid slots hold its positions in order).

    Returns:
        `(input_ids (batch, n), position_ids (batch, n), attention_mask (batch, 1, n, cache_length + n))`: a node sees
        its row's valid cache slots, itself and its ancestors; a padding node sees only itself.
    """
    device = key_valid.device
    rows, width = len(trees), max(tree.num_nodes for tree in trees)
    tokens = torch.full((rows, width), pad_token_id, dtype=torch.long, device=device)
    depths = torch.zeros(rows, width, dtype=torch.long, device=device)
    ancestors = torch.eye(width, dtype=torch.bool, device=device).repeat(rows, 1, 1)
    for row, tree in enumerate(trees):
        size = tree.num_nodes
        tokens[row, :size] = tree.tokens
        depths[row, :size] = tree.depths
        ancestors[row, :size, :size] = tree.ancestor_mask
    allowed = torch.cat([key_valid[:, None, :].expand(-1, width, -1), ancestors], dim=-1)
    positions = root_position_ids[:, None] + depths
    if config is None or sliding_window(config) is None:
        return tokens, positions, additive_mask(allowed, dtype)
    key_positions = torch.cat([key_valid.long().cumsum(-1) - 1, positions], dim=-1)
    return tokens, positions, verify_attention_mask(config, allowed, positions, key_positions, dtype)
