"""What a call may run: inputs, cache and attention checked before any forward, with an error that says what to do."""

from __future__ import annotations

from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .attention import TREE_ATTENTION
from .compat import GENERATE_CACHE_KEY
from .masks import sliding_window
from .verify import TREE_MASK_ATTENTION


def validated_cache(model_kwargs: dict, generation_config=None, allow_prefilled: bool = False) -> DynamicCache:
    """The plain `DynamicCache` generate() prepared for this call (the batch-1 and batched loops both need one): empty,
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
            "Batched JetSpec decoding starts from an empty cache: for a second turn of a batch, pass the whole "
            "conversations as `input_ids` without `past_key_values` (a single prompt can continue its cache)."
        )
    return cache


def check_inputs(model, input_ids, head, model_kwargs) -> None:
    """Refuses, before any forward, what a JetSpec call cannot run exactly: `inputs_embeds`, an empty prompt, a pre-
    filled cache for a batch, a head whose dtype differs from the target's (bad tree settings are refused when the call's
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


def validate_single(model, input_ids, generation_config, head, model_kwargs) -> DynamicCache:
    for name in ("output_attentions", "output_hidden_states"):
        if getattr(generation_config, name, False) and generation_config.return_dict_in_generate:
            raise ValueError(f"`{name}=True` is not supported with a JetSpec head; `output_scores`/`output_logits` are.")
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
    cache = validated_cache(model_kwargs, generation_config, allow_prefilled=True)
    if cache.get_seq_length() >= input_ids.shape[1]:
        raise ValueError(
            f"`past_key_values` already holds {cache.get_seq_length()} positions, but `input_ids` has only "
            f"{input_ids.shape[1]}: pass the whole conversation so far (its cached part plus at least one new token)."
        )
    head.bind(model)
    return cache
