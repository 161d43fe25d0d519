"""What a call may run: inputs, cache and attention checked before any forward, with an error that says what to do."""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .attention import TREE_ATTENTION
from .compat import GENERATE_CACHE_KEY
from .masks import sliding_window
from .verify import TREE_MASK_ATTENTION


def validated_cache(model_kwargs: dict, generation_config=None, allow_prefilled: bool = False) -> DynamicCache:
    """The plain `DynamicCache` generate() prepared for this call (the decode loop needs one): empty,
    or with `allow_prefilled` (one prompt) the first turn's cache passed back as `past_key_values`.

    For a target with sliding-window layers generate() prepares a `DynamicCache` whose sliding layers keep only the
    window; tree compaction needs every position, so that (still empty) cache is replaced by a plain one, in
    `model_kwargs` too, and the window goes into the verify masks (`masks.py`).
    """
    if not model_kwargs.get("use_cache", True):
        raise ValueError("JetSpec tree decoding needs the KV cache: do not pass `use_cache=False`.")
    cache = model_kwargs.get(GENERATE_CACHE_KEY)
    if cache is None:  # transformers >= 5.25 leaves the cache to the model's first forward
        requested = getattr(generation_config, "cache_implementation", None)
        if requested not in (None, "dynamic"):
            raise ValueError(f"JetSpec tree decoding needs a plain DynamicCache, got cache_implementation={requested!r}: "
                             "drop `cache_implementation`.")
        cache = model_kwargs[GENERATE_CACHE_KEY] = DynamicCache()
    if (type(cache) is DynamicCache and cache.get_seq_length() == 0
            and all(isinstance(layer, DynamicLayer) for layer in cache.layers)):
        cache = model_kwargs[GENERATE_CACHE_KEY] = DynamicCache()
    if not isinstance(cache, DynamicCache) or any(type(layer) is not DynamicLayer for layer in cache.layers):
        raise ValueError(
            f"JetSpec tree decoding needs a plain DynamicCache (no static, sliding-window or quantized cache), got "
            f"{type(cache).__name__}: drop `cache_implementation` / `past_key_values`."
        )
    if cache.get_seq_length() > 0 and not allow_prefilled:
        raise ValueError(
            "Batched JetSpec decoding starts from an empty cache: for a second turn of a batch (or of a padded "
            "prompt), pass the whole conversations as `input_ids` without `past_key_values` (a single unpadded prompt "
            "can continue its cache)."
        )
    return cache


def check_inputs(model, input_ids, head, model_kwargs) -> None:
    """Refuses, before any forward, what a JetSpec call cannot run exactly: `inputs_embeds`, an empty prompt, a head
    whose dtype differs from the target's (bad tree settings are refused when the call's
    [`TreeSettings`] are made)."""
    if model_kwargs.get("inputs_embeds") is not None:
        raise ValueError(
            "A JetSpec head drafts token ids and the target verifies them through its own embeddings, so "
            "`inputs_embeds` cannot be used with `assistant_model=head`: pass `input_ids` (e.g. "
            "tokenizer(text, return_tensors='pt').input_ids), or drop `assistant_model`."
        )
    if input_ids.shape[-1] == 0:
        raise ValueError(
            "The prompt is empty: JetSpec decoding (like the target itself) needs at least one prompt token. Start "
            "from the tokenizer's BOS token or a chat template's generation prompt."
        )
    head_dtype, target_dtype = head.dtype, model.dtype
    if head_dtype != target_dtype and head.training:  # in eval mode, bind() casts the head to the target's dtype
        raise ValueError(
            f"The JetSpec head is {head_dtype} and the target {target_dtype}, and the head is in training mode, so "
            f"generate() does not cast it: call `head.eval()` (generate() then casts it in place) or "
            f"`head.to({target_dtype})`."
        )


def left_padding_mask(attention_mask: torch.Tensor | None, input_ids: torch.LongTensor) -> torch.LongTensor:
    """The `(batch, length)` 0/1 mask of a left-padded batch (all ones when `attention_mask` is `None`).

    Raises:
        `ValueError`: for right (or inner) padding, or a row without a single token.
    """
    if attention_mask is None:
        return torch.ones_like(input_ids)
    mask = attention_mask.long()
    if bool(((mask != 0) & (mask != 1)).any()) or bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError(
            "Batched JetSpec decoding needs left padding (every row: padding first, then its tokens, as decoder-only "
            "generation expects): pad with `tokenizer.padding_side = 'left'`."
        )
    if bool((mask[:, -1] == 0).any()):
        raise ValueError("Every row of a batch needs at least one prompt token (an all-padding row was given).")
    return mask


# Logits processors that keep per-call state across steps or run the model on a batch of their own: in a batch, a
# row's tokens are processed alone, at its own pace, so these cannot see the batch they expect. (Those that only index
# the batch get a per-row copy, see `accept.row_logits_processors`.)
BATCH_INDEXED_PROCESSORS = (
    "ClassifierFreeGuidanceLogitsProcessor",
    "UnbatchedClassifierFreeGuidanceLogitsProcessor",
    "SynthIDTextWatermarkLogitsProcessor",
)


def validate_call(model, input_ids, logits_processor, generation_config, head,
                  model_kwargs) -> tuple[DynamicCache, torch.LongTensor]:
    """Everything checked before the first forward of a call; returns the target cache to fill and the prompts'
    left-padding mask `(batch, length)`. One unpadded prompt may continue a first turn's cache (`past_key_values`)."""
    check_inputs(model, input_ids, head, model_kwargs)
    batch = input_ids.shape[0]
    if generation_config.return_dict_in_generate:
        for name in ("output_attentions", "output_hidden_states"):
            if getattr(generation_config, name, False):
                raise ValueError(
                    f"`{name}=True` is not supported with a JetSpec head: the target's forwards run over trees, not "
                    "one position per step. `output_scores`/`output_logits` are supported; drop `assistant_model` for "
                    "attentions or hidden states."
                )
    attn = model.config._attn_implementation
    if attn not in TREE_MASK_ATTENTION:
        raise ValueError(
            f"The target uses attn_implementation={attn!r}, which cannot take a tree attention mask. "
            f"Load it with attn_implementation='sdpa' (or one of {TREE_MASK_ATTENTION})."
        )
    if attn == TREE_ATTENTION and sliding_window(model.config) is not None:
        raise ValueError(
            f"attn_implementation={TREE_ATTENTION!r} cannot express the sliding window of this target's "
            f"sliding-window layers (window {sliding_window(model.config)}): load it with attn_implementation='sdpa'."
        )
    batch_indexed = [type(p).__name__ for p in logits_processor if type(p).__name__ in BATCH_INDEXED_PROCESSORS]
    if batch_indexed and batch > 1:
        raise ValueError(
            f"{batch_indexed[0]} is not supported by batched JetSpec decoding (it keeps state across steps or runs "
            "the model on a batch of its own, while each row is processed at its own pace): call generate() per "
            "prompt."
        )
    mask = left_padding_mask(model_kwargs.get("attention_mask"), input_ids)
    cache = validated_cache(model_kwargs, generation_config, allow_prefilled=batch == 1 and bool(mask.all()))
    if cache.get_seq_length() >= input_ids.shape[1]:
        raise ValueError(
            f"`past_key_values` already holds {cache.get_seq_length()} positions, but `input_ids` has only "
            f"{input_ids.shape[1]}: pass the whole conversation so far (its cached part plus at least one new token)."
        )
    head.bind(model)
    return cache, mask
