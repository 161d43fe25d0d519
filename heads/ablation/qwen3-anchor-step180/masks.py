"""Additive attention masks: the form both sdpa and eager attention take, and the verify forward's masks for each of
the target's layer types (full attention and sliding windows).

A verify forward hands the target a 4D mask (every tree node sees the committed prefix, itself and its ancestors),
which Transformers uses as given. For sliding-window layers (Mistral, Mixtral, Qwen2 with `use_sliding_window`,
Gemma 2/3, GPT-OSS, ...) that mask must also hide the keys outside the window, as Transformers' own
`sliding_window_overlay` does (`query_position - key_position < sliding_window`). Models with `layer_types` take a
dict of masks per layer type; models whose every layer slides (no `layer_types`) take the sliding mask alone. The
cache keeps every position (a plain `DynamicCache`): the window lives in the mask only.
"""

from __future__ import annotations

import torch


def additive_mask(allowed: torch.BoolTensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where `allowed`, the dtype's minimum elsewhere (what both sdpa and eager attention take), with a head
    dimension inserted at 1."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask.unsqueeze(-3)


def sliding_window(config) -> int | None:
    """The window of the target's sliding-window layers, or `None` when no layer slides."""
    config = config.get_text_config()
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return int(window) if "sliding_attention" in layer_types else None
    return None if getattr(config, "use_sliding_window", True) is False else int(window)


def verify_attention_mask(
    config,
    allowed: torch.BoolTensor,
    query_positions: torch.LongTensor,
    key_positions: torch.LongTensor,
    dtype: torch.dtype,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The attention mask(s) of one verify forward.

    Args:
        config (`PretrainedConfig`): the target's config.
        allowed (`torch.BoolTensor` of shape `(batch, queries, keys)`): what each query may see under full attention.
        query_positions (`torch.LongTensor` of shape `(batch, queries)`): the queries' positions.
        key_positions (`torch.LongTensor` of shape `(batch, keys)`): the keys' positions (cache slots, then the
            queries themselves).
        dtype (`torch.dtype`): dtype of the additive masks.

    Returns:
        An additive mask `(batch, 1, queries, keys)`, or `{"full_attention": ..., "sliding_attention": ...}` for
        models with both layer types.
    """
    window = sliding_window(config)
    if window is None:
        return additive_mask(allowed, dtype)
    in_window = allowed & (query_positions[:, :, None] - key_positions[:, None, :] < window)
    sliding = additive_mask(in_window, dtype)
    if getattr(config.get_text_config(), "layer_types", None) is None:
        return sliding
    return {"full_attention": additive_mask(allowed, dtype), "sliding_attention": sliding}
