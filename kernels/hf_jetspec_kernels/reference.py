"""Plain PyTorch ground truth for tree attention: the packed ancestor bitmask and a float64 reference.

A verification forward attends `num_nodes` tree rows to a prefix of `prefix_length` cached keys (all visible) and to
the tree's own keys under an ancestor mask (node `i` sees node `j` when `j` is `i` or one of its ancestors). The mask
travels packed: bit `j % 32` of word `j // 32` in row `i` is set when node `i` sees node `j`. A row with no bit set is a
padding row: it sees no key at all (not even the prefix) and its output is zero.
"""

from __future__ import annotations

import torch

BITS_PER_WORD = 32


def num_words(num_nodes: int) -> int:
    """Words of a packed mask row: `ceil(num_nodes / 32)`."""
    return -(-num_nodes // BITS_PER_WORD)


def ancestor_mask_from_parents(parents: list[int], device: torch.device | str = "cpu") -> torch.BoolTensor:
    """`(num_nodes, num_nodes)` ancestor mask of a parents-first tree: `[i, j]` is True when `j` is `i` or an ancestor.

    Args:
        parents (`list[int]`): parent index of each node, `-1` for a root; a parent is listed before its children.
            Several roots (a forest) are allowed.
    """
    num_nodes = len(parents)
    mask = torch.eye(num_nodes, dtype=torch.bool)
    for node, parent in enumerate(parents):
        if parent >= node:
            raise ValueError(f"node {node} has parent {parent}: list every parent before its children")
        if parent >= 0:
            mask[node] |= mask[parent]
    return mask.to(device)


def pack_ancestor_mask(mask: torch.BoolTensor) -> torch.IntTensor:
    """Packs a boolean tree mask into int32 words, 32 columns a word (least significant bit first).

    Args:
        mask (`torch.BoolTensor` of shape `(..., num_nodes, num_nodes)`): `[..., i, j]` is True when node `i` sees
            node `j`.

    Returns:
        `torch.IntTensor` of shape `(..., num_nodes, ceil(num_nodes / 32))`.
    """
    if mask.dtype != torch.bool or mask.ndim < 2 or mask.shape[-1] != mask.shape[-2]:
        raise ValueError(f"expected a square boolean mask (..., n, n), got {tuple(mask.shape)} {mask.dtype}")
    num_nodes = mask.shape[-1]
    words = num_words(num_nodes)
    padded = torch.nn.functional.pad(mask, (0, words * BITS_PER_WORD - num_nodes)).to(torch.int64)
    weights = torch.ones(BITS_PER_WORD, dtype=torch.int64, device=mask.device) << torch.arange(
        BITS_PER_WORD, device=mask.device
    )
    packed = (padded.unflatten(-1, (words, BITS_PER_WORD)) * weights).sum(-1)  # in [0, 2**32)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)  # two's complement: bit 31 is the sign bit
    return packed.to(torch.int32)


def unpack_ancestor_bits(bits: torch.IntTensor, num_nodes: int) -> torch.BoolTensor:
    """Inverse of [`pack_ancestor_mask`]: `(..., num_nodes, words)` int32 -> `(..., num_nodes, num_nodes)` bool."""
    shifts = torch.arange(BITS_PER_WORD, dtype=torch.int32, device=bits.device)
    unpacked = (bits[..., None] >> shifts) & 1  # arithmetic shift, but `& 1` keeps exactly bit `shift`
    return unpacked.flatten(-2)[..., :num_nodes].bool()


def tree_visibility(tree_bits: torch.IntTensor, prefix_length: int) -> torch.BoolTensor:
    """Dense boolean visibility `(..., num_nodes, prefix_length + num_nodes)` of a packed tree mask: every live row
    sees the whole prefix, padding rows (no bit set) see nothing."""
    num_nodes = tree_bits.shape[-2]
    ancestors = unpack_ancestor_bits(tree_bits, num_nodes)
    live = ancestors.any(-1, keepdim=True)
    return torch.cat([live.expand(*ancestors.shape[:-1], prefix_length), ancestors], dim=-1)


def tree_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix_length: int,
    tree_bits: torch.IntTensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Tree attention in float64 with an explicit softmax (the ground truth the kernel is tested against).

    Args:
        q (`torch.Tensor` of shape `(batch, num_heads, num_nodes, head_dim)`): queries of the tree rows.
        k, v (`torch.Tensor` of shape `(batch, num_kv_heads, prefix_length + num_nodes, head_dim)`): the prefix's
            keys/values followed by the tree's; `num_heads` is a multiple of `num_kv_heads` (GQA/MQA).
        prefix_length (`int`): cached keys every live tree row sees.
        tree_bits (`torch.IntTensor` of shape `(num_nodes, words)` or `(batch, num_nodes, words)`): packed
            ancestor mask, see [`pack_ancestor_mask`].
        scale (`float`, *optional*): softmax scale, `head_dim ** -0.5` by default.

    Returns:
        `torch.DoubleTensor` of shape `(batch, num_heads, num_nodes, head_dim)`; padding rows are zero.
    """
    num_heads, num_nodes, head_dim = q.shape[1], q.shape[2], q.shape[3]
    group = num_heads // k.shape[1]
    scale = head_dim**-0.5 if scale is None else scale
    allowed = tree_visibility(tree_bits.to(q.device), prefix_length)
    allowed = allowed[None] if allowed.ndim == 2 else allowed  # (batch | 1, num_nodes, keys)
    keys = k.double().repeat_interleave(group, dim=1)
    values = v.double().repeat_interleave(group, dim=1)
    scores = (q.double() @ keys.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    weights = torch.softmax(scores, dim=-1).masked_fill(~allowed.any(-1)[:, None, :, None], 0.0)  # NaN rows -> 0
    return weights @ values
