"""The JetSpec training objective as pure functions: random anchors, and KL(target || head) per drafted depth.

For a sequence `x[0..T-1]` with target distributions `p_t` (the target's next-token distribution after `x[0..t]`),
a block anchored at position `a` drafts depth `d` = the token at `a + d`, whose target distribution is `p_{a+d-1}`.
The block sees the target's context rows at positions `< a` (see `hf_jetspec.draft_attention_mask`), exactly as at
inference, where the anchor is the last committed token that the target has not processed yet.
"""

from __future__ import annotations

import torch


def sample_anchors(
    prompt_length: int, sequence_length: int, max_anchors: int, generator: torch.Generator | None = None
) -> torch.LongTensor:
    """Up to `max_anchors` distinct random anchor positions in the response, sorted.

    Anchors lie in `[prompt_length, sequence_length - 2]`: the first generated token onwards, leaving at least one
    token to draft.

    Returns:
        `torch.LongTensor` of shape `(n,)`, `n <= max_anchors` (0 when the response is too short).
    """
    low, high = prompt_length, sequence_length - 2
    if high < low or max_anchors < 1:
        return torch.zeros(0, dtype=torch.long)
    candidates = torch.arange(low, high + 1)
    if candidates.numel() > max_anchors:
        candidates = candidates[torch.randperm(candidates.numel(), generator=generator)[:max_anchors]].sort().values
    return candidates


def depth_weights(block_size: int, decay: float | None = None) -> torch.Tensor:
    """Per-depth loss weights for depths `1 .. block_size - 1`: uniform (JetSpec) or `decay ** (d - 1)` (DFlash-like),
    normalised to sum to 1."""
    depths = torch.arange(block_size - 1, dtype=torch.float32)
    weights = torch.ones_like(depths) if decay is None else decay**depths
    return weights / weights.sum()


def teacher_rows(anchor_positions: torch.LongTensor, block_size: int, sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every (anchor, depth): the position whose target distribution is the label, and whether it exists.

    Args:
        anchor_positions (`torch.LongTensor` of shape `(batch, num_anchors)`).
        block_size (`int`).
        sequence_length (`int` or `torch.LongTensor` of shape `(batch,)`): tokens with a target distribution.

    Returns:
        `(rows, valid)`, both of shape `(batch, num_anchors, block_size - 1)`: `rows = anchor + d - 1`, clamped into
        range where invalid.
    """
    depths = torch.arange(1, block_size, device=anchor_positions.device)
    rows = anchor_positions[..., None] + depths - 1
    length = torch.as_tensor(sequence_length, device=rows.device).reshape(-1, 1, 1)
    valid = rows < length
    return torch.where(valid, rows, torch.zeros_like(rows)), valid


def candidate_vocabulary(
    teacher_ids: torch.LongTensor,
    valid: torch.BoolTensor,
    vocab_size: int,
    num_negatives: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """The tokens a batch's loss is computed over when the full-vocabulary softmax is too expensive (CPU training).

    The set is every teacher top-k token of a valid (anchor, depth) pair plus `num_negatives` tokens drawn uniformly
    from the rest of the vocabulary, so the head also learns to keep probability off tokens the target never
    proposes in this batch. The lm_head is frozen and shared with the target, so what the head learns is its hidden
    state; the full-vocabulary distribution is what drafting uses and what tau measures.

    Args:
        teacher_ids (`torch.LongTensor` of shape `(..., k)`): teacher top-k token ids.
        valid (`torch.BoolTensor` of shape `teacher_ids.shape[:-1]`): pairs that count.
        vocab_size (`int`), num_negatives (`int`), generator (`torch.Generator`, *optional*).

    Returns:
        `(vocabulary, local_teacher_ids)`: the sorted token ids `(n,)`, and `teacher_ids` as indices into it (ids of
        invalid pairs map to index 0).
    """
    kept = teacher_ids[valid].flatten()
    if num_negatives > 0:
        negatives = torch.randint(vocab_size, (num_negatives,), generator=generator).to(kept.device)
        kept = torch.cat([kept, negatives])
    vocabulary = kept.unique(sorted=True)
    if vocabulary.numel() == 0:
        vocabulary = torch.zeros(1, dtype=torch.long, device=teacher_ids.device)
    local = torch.searchsorted(vocabulary, teacher_ids).clamp_max(vocabulary.numel() - 1)
    local = torch.where(valid[..., None], local, torch.zeros_like(local))
    return vocabulary, local


def distillation_loss(
    head_logits: torch.Tensor,
    teacher_ids: torch.LongTensor,
    teacher_probs: torch.Tensor,
    valid: torch.BoolTensor,
    weights: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KL(target || head) per depth, up to the target's entropy (a constant), with the target's distribution kept
    as its top-k tokens (renormalised).

    Args:
        head_logits (`torch.FloatTensor` of shape `(batch, num_anchors, depth, vocab)`): over the full vocabulary,
            or over a [`candidate_vocabulary`] (then `teacher_ids` index into it).
        teacher_ids (`torch.LongTensor` of shape `(batch, num_anchors, depth, k)`): target's top-k token ids.
        teacher_probs (`torch.FloatTensor` of shape `(batch, num_anchors, depth, k)`): their probabilities.
        valid (`torch.BoolTensor` of shape `(batch, num_anchors, depth)`): which (anchor, depth) pairs count.
        weights (`torch.FloatTensor` of shape `(depth,)`): per-depth weights.

    Returns:
        `(loss, metrics)`: the weighted mean cross-entropy over valid pairs, and per-depth top-1 agreement with the
        target's argmax (`metrics["accuracy"]`, shape `(depth,)`) plus the count of valid pairs.
    """
    log_q = head_logits.float().log_softmax(dim=-1)
    probs = teacher_probs.float()
    probs = probs / probs.sum(-1, keepdim=True).clamp_min(1e-12)
    cross_entropy = -(probs * log_q.gather(-1, teacher_ids)).sum(-1)  # (batch, anchors, depth)
    mask = valid.float()
    per_depth_count = mask.sum(dim=(0, 1))
    per_depth_loss = (cross_entropy * mask).sum(dim=(0, 1)) / per_depth_count.clamp_min(1)
    present = per_depth_count > 0
    loss = (per_depth_loss * weights.to(per_depth_loss))[present].sum() / weights.to(per_depth_loss)[present].sum().clamp_min(1e-12)
    with torch.no_grad():
        hits = (head_logits.argmax(-1) == teacher_ids[..., 0]).float() * mask
        accuracy = hits.sum(dim=(0, 1)) / per_depth_count.clamp_min(1)
    return loss, {"accuracy": accuracy, "count": per_depth_count}
