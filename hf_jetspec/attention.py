"""`attn_implementation="jetspec_tree"`: Triton tree attention for verification forwards, plain SDPA otherwise.

`import hf_jetspec` registers the name in Transformers' `AttentionInterface` (the attention function) and
`AttentionMaskInterface` (the mask builder; without it the mask would silently arrive as `None`), so

    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="jetspec_tree")

loads a model whose ordinary forwards (prefill, decode, training) run exactly as with `"sdpa"`: same mask function,
same attention function.

A tree verification forward passes the tree's packed ancestor bits as a 4D int32 `attention_mask` of shape
`(1, 1, num_nodes, ceil(num_nodes / 32))` (see [`packed_tree_mask`]). Transformers hands any 4D mask to the
attention layers as is (`create_causal_mask` builds nothing), so no dense `(num_nodes, past + num_nodes)` mask is
made, and the attention function recognises the int32 dtype (dense masks are bool or float). The keys before the
tree (`key_length - num_nodes` of them) are the prefix every node sees. Then:

- on CUDA, or on CPU with `TRITON_INTERPRET=1` (Triton's interpreter; set it before Python starts, since Triton
  picks the mode when it is imported), the Triton kernel of `hf_jetspec_kernels.tree_attention` runs;
- anywhere else an exact PyTorch path (the dense boolean mask rebuilt from the bits, then SDPA) runs, and a single
  warning per process says so.

Models loaded with `attn_implementation="sdpa"` verify trees with a dense mask. Transformers' SDPA function then
repeats every key/value head for its query heads (`repeat_kv`: a copy of the whole cache per layer and forward) unless
the forward has one query row (`pack_gqa`). Inside [`verification_attention`] (the verify forward only, on that
thread only) `"sdpa"` runs [`gqa_sdpa_attention_forward`] instead: the query heads sharing a key/value head are
folded into the query rows, the same computation without the copies.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from hf_jetspec_kernels.reference import tree_visibility

logger = logging.getLogger(__name__)

TREE_ATTENTION = "jetspec_tree"
GQA_ATTENTION = "jetspec_sdpa_gqa"


def packed_tree_mask(tree_bits: torch.IntTensor) -> torch.IntTensor:
    """The `attention_mask` of a tree verification forward under `attn_implementation="jetspec_tree"`.

    Args:
        tree_bits (`torch.IntTensor` of shape `(num_nodes, ceil(num_nodes / 32))`): packed ancestor mask (see
            `hf_jetspec_kernels.pack_ancestor_mask`, or [`DraftTree.packed_ancestor_bits`]).

    Returns:
        `torch.IntTensor` of shape `(1, 1, num_nodes, ceil(num_nodes / 32))`.
    """
    if tree_bits.dtype != torch.int32 or tree_bits.ndim != 2:
        raise ValueError(
            f"expected int32 packed bits (num_nodes, words), got {tree_bits.dtype} {tuple(tree_bits.shape)}"
        )
    return tree_bits[None, None]


def kernel_available(device: torch.device) -> bool:
    """Whether tree forwards on `device` run the Triton kernel: on CUDA, or on CPU under `TRITON_INTERPRET=1`."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def _warn_fallback_once() -> None:
    logger.warning(
        "attn_implementation='jetspec_tree' off CUDA without TRITON_INTERPRET=1: tree forwards use an exact PyTorch "
        "fallback (dense mask + SDPA) instead of the Triton kernel. Run on CUDA for the kernel, or set "
        "TRITON_INTERPRET=1 before starting Python to run it in Triton's (slow) interpreter."
    )


def _tree_attention_fallback(module, query, key, value, tree_bits, scaling) -> torch.Tensor:
    """Exact PyTorch path: the dense visibility rebuilt from the bits, then Transformers' SDPA attention. Padding
    rows (no bit set) would come out of SDPA as NaN: they are zeroed, as the kernel leaves them."""
    num_nodes = query.shape[2]
    allowed = tree_visibility(tree_bits, key.shape[2] - num_nodes)
    allowed = allowed[None] if allowed.ndim == 2 else allowed  # (batch | 1, num_nodes, keys)
    out, _ = sdpa_attention_forward(module, query, key, value, allowed[:, None], dropout=0.0, scaling=scaling)
    live = allowed.any(-1)  # (batch | 1, num_nodes)
    return out.masked_fill(~live[:, :, None, None], 0.0)


def jetspec_tree_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The `"jetspec_tree"` attention function (Transformers' attention-interface signature).

    Args:
        module (`torch.nn.Module`): the attention layer (for `num_key_value_groups`).
        query (`torch.Tensor` of shape `(batch, num_heads, q_length, head_dim)`).
        key, value (`torch.Tensor` of shape `(batch, num_kv_heads, kv_length, head_dim)`): the cache after this
            forward's keys were appended.
        attention_mask (`torch.Tensor`, *optional*): a dense mask (bool or additive float, `(batch, 1, q_length,
            kv_length)`) or `None` -> Transformers' SDPA path, unchanged; or packed tree bits (int32, `(batch | 1, 1,
            q_length, ceil(q_length / 32))`, see [`packed_tree_mask`]) -> tree attention, the last `q_length` keys
            being the tree's and all earlier ones the prefix.
        dropout (`float`): must be 0 for tree forwards (verification runs in eval mode).
        scaling (`float`, *optional*): softmax scale, `head_dim ** -0.5` by default.

    Returns:
        `(attn_output, None)`, `attn_output` of shape `(batch, q_length, num_heads, head_dim)`.
    """
    if attention_mask is None or attention_mask.dtype != torch.int32:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )

    num_nodes = query.shape[2]
    if attention_mask.ndim != 4 or attention_mask.shape[1] != 1 or attention_mask.shape[2] != num_nodes:
        raise ValueError(
            f"packed tree bits for {num_nodes} query rows must have shape (batch | 1, 1, {num_nodes}, "
            f"{-(-num_nodes // 32)}), got {tuple(attention_mask.shape)}: build them with packed_tree_mask()"
        )
    if dropout:
        raise ValueError("jetspec_tree tree attention has no dropout: call the model in eval mode (model.eval()).")
    for option in ("sliding_window", "softcap", "position_bias"):
        if kwargs.get(option) is not None:
            raise ValueError(
                f"jetspec_tree tree attention does not support `{option}` (layer {getattr(module, 'layer_idx', '?')}): "
                "load this model with attn_implementation='sdpa'."
            )
    tree_bits = attention_mask[:, 0]
    tree_bits = tree_bits[0] if tree_bits.shape[0] == 1 else tree_bits
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    if kernel_available(query.device):
        from .extras import require

        require("kernels", "attn_implementation='jetspec_tree'")
        from hf_jetspec_kernels.tree_attention import tree_attention

        out = tree_attention(query, key, value, key.shape[2] - num_nodes, tree_bits, scale=scaling)
        return out.transpose(1, 2), None  # the kernel's buffer is (batch, q_length, num_heads, head_dim): contiguous
    _warn_fallback_once()
    return _tree_attention_fallback(module, query, key, value, tree_bits, scaling), None


def gqa_sdpa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Transformers' SDPA attention, with grouped-query attention done by folding instead of `repeat_kv`.

    For several query rows and a dense mask shared by the heads (`(batch | 1, 1, q_length, kv_length)`), the
    `groups` query heads of each key/value head become `groups * q_length` query rows of that head (head-major, as
    `repeat_kv` pairs them) and the mask is repeated to match, so SDPA reads the cache as it is. Anything else
    (one query row, no mask, per-head masks, dropout, softcap, position bias, no grouping) goes to Transformers'
    `sdpa_attention_forward` unchanged.

    Returns:
        `(attn_output, None)`, `attn_output` of shape `(batch, q_length, num_heads, head_dim)`.
    """
    groups = getattr(module, "num_key_value_groups", 1)
    q_length = query.shape[2]
    if (
        groups == 1
        or q_length == 1
        or attention_mask is None
        or attention_mask.ndim != 4
        or attention_mask.shape[1] != 1
        or dropout
        or any(kwargs.get(option) is not None for option in ("softcap", "position_bias", "sinks", "s_aux"))
        or query.shape[-1] != value.shape[-1]
    ):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    batch, num_heads, _, head_dim = query.shape
    folded = query.reshape(batch, num_heads // groups, groups * q_length, head_dim)
    mask = attention_mask.repeat(1, 1, groups, 1)  # row g * q_length + t is query row t's mask
    out = torch.nn.functional.scaled_dot_product_attention(folded, key, value, attn_mask=mask, scale=scaling)
    return out.reshape(batch, num_heads, q_length, head_dim).transpose(1, 2).contiguous(), None


_VERIFYING = threading.local()  # per thread: inside a verify forward of an sdpa decoder


def sdpa_or_folded_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """Transformers' `"sdpa"` attention, except inside [`verification_attention`] on this thread, where the query
    heads sharing a key/value head are folded ([`gqa_sdpa_attention_forward`]). Registered as `"sdpa"` on
    `import hf_jetspec`: every other forward, on any thread, runs Transformers' own `sdpa_attention_forward`."""
    if getattr(_VERIFYING, "active", False):
        return gqa_sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@contextlib.contextmanager
def verification_attention(decoder: torch.nn.Module):
    """Within the block, on this thread only, a decoder loaded with `attn_implementation="sdpa"` runs
    [`gqa_sdpa_attention_forward`] (same inputs and math, no key/value copies); other backends are left as they are.
    Nothing shared is switched (the model's config keeps `"sdpa"`), so concurrent forwards on other threads, with
    or without a JetSpec head, run as they would alone."""
    config = getattr(decoder, "config", None)
    if getattr(config, "_attn_implementation_internal", None) != "sdpa" or getattr(_VERIFYING, "active", False):
        yield
        return
    _VERIFYING.active = True
    try:
        yield
    finally:
        _VERIFYING.active = False


def register_tree_attention() -> None:
    """Registers `"jetspec_tree"` and `"jetspec_sdpa_gqa"` in Transformers' attention and attention-mask interfaces
    (idempotent)."""
    AttentionInterface.register(TREE_ATTENTION, jetspec_tree_attention_forward)
    AttentionMaskInterface.register(TREE_ATTENTION, sdpa_mask)
    AttentionInterface.register(GQA_ATTENTION, gqa_sdpa_attention_forward)
    AttentionMaskInterface.register(GQA_ATTENTION, sdpa_mask)
    AttentionInterface.register("sdpa", sdpa_or_folded_attention_forward)
