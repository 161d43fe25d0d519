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
    with torch.no_grad():
        hits = head_logits.argmax(-1) == teacher_ids[..., 0]
    return _reduce_per_depth(cross_entropy, hits, valid, weights)


def _reduce_per_depth(cross_entropy: torch.Tensor, hits: torch.BoolTensor, valid: torch.BoolTensor,
                      weights: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-(anchor, depth) cross-entropies and top-1 hits -> the depth-weighted loss over valid pairs, and per-depth
    agreement and counts."""
    mask = valid.float()
    per_depth_count = mask.sum(dim=(0, 1))
    per_depth_loss = (cross_entropy * mask).sum(dim=(0, 1)) / per_depth_count.clamp_min(1)
    present = per_depth_count > 0
    loss = (per_depth_loss * weights.to(per_depth_loss))[present].sum() / weights.to(per_depth_loss)[present].sum().clamp_min(1e-12)
    with torch.no_grad():
        accuracy = (hits.float() * mask).sum(dim=(0, 1)) / per_depth_count.clamp_min(1)
    return loss, {"accuracy": accuracy, "count": per_depth_count}


class _CandidateCrossEntropy(torch.autograd.Function):
    """Soft-label cross-entropy over candidate-vocabulary logits `hidden @ weight.T`, computed and differentiated in
    chunks of rows: the float32 `(rows, vocabulary)` logits, their log-softmax and its gradient are never held whole
    (only the logits in the matmul's dtype are kept for the backward; the lm_head rows are frozen: no gradient for
    `weight`)."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher_ids, teacher_probs, compute_dtype, chunk_rows):
        rows = hidden.shape[0]
        cross_entropy = hidden.new_empty(rows, dtype=torch.float32)
        top1 = torch.empty(rows, dtype=torch.long, device=hidden.device)
        log_normalizer = hidden.new_empty(rows, dtype=torch.float32)
        low_weight = weight.to(compute_dtype)
        kept = hidden.new_empty(rows, weight.shape[0], dtype=compute_dtype)
        for start in range(0, rows, chunk_rows):
            end = min(start + chunk_rows, rows)
            torch.matmul(hidden[start:end].to(compute_dtype), low_weight.T, out=kept[start:end])
            logits = kept[start:end].float()
            lse = logits.logsumexp(-1)
            probs = teacher_probs[start:end]
            cross_entropy[start:end] = probs.sum(-1) * lse - (probs * logits.gather(-1, teacher_ids[start:end])).sum(-1)
            top1[start:end] = logits.argmax(-1)
            log_normalizer[start:end] = lse
        ctx.save_for_backward(kept, low_weight, teacher_ids, teacher_probs, log_normalizer)
        ctx.hidden_dtype = hidden.dtype
        ctx.chunk_rows = chunk_rows
        ctx.mark_non_differentiable(top1)
        return cross_entropy, top1

    @staticmethod
    def backward(ctx, grad_cross_entropy, _grad_top1):
        kept, low_weight, teacher_ids, teacher_probs, log_normalizer = ctx.saved_tensors
        grad_hidden = kept.new_empty(kept.shape[0], low_weight.shape[1], dtype=ctx.hidden_dtype)
        for start in range(0, kept.shape[0], ctx.chunk_rows):
            end = min(start + ctx.chunk_rows, kept.shape[0])
            logits = kept[start:end].float()
            probs, grad = teacher_probs[start:end], grad_cross_entropy[start:end, None]
            # d(sum(p) * lse - p . z) / dz = sum(p) * softmax(z) - p (scattered onto the teacher's tokens)
            grad_logits = (logits - log_normalizer[start:end, None]).exp_().mul_(probs.sum(-1, keepdim=True) * grad)
            grad_logits.scatter_add_(-1, teacher_ids[start:end], -probs * grad)
            grad_hidden[start:end] = (grad_logits.to(low_weight.dtype) @ low_weight).to(ctx.hidden_dtype)
        return grad_hidden, None, None, None, None, None


def candidate_distillation_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    teacher_ids: torch.LongTensor,
    teacher_probs: torch.Tensor,
    valid: torch.BoolTensor,
    weights: torch.Tensor,
    chunk_rows: int = 512,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """[`distillation_loss`] of the logits `hidden @ weight.T` (no softcapping), without materialising them: the same
    loss and agreement, computed chunk by chunk (CPU training spends most of a step on these logits otherwise).

    Args:
        hidden (`torch.FloatTensor` of shape `(batch, num_anchors, depth, hidden_size)`): the drafted rows' states.
        weight (`torch.FloatTensor` of shape `(vocab, hidden_size)`): lm_head rows of the candidate vocabulary
            (frozen).
        teacher_ids, teacher_probs, valid, weights: as in [`distillation_loss`] (`teacher_ids` index `weight`'s rows).
        chunk_rows (`int`): rows of logits computed at once.

    The matmul runs in the CPU autocast dtype when autocast is on (as `hidden @ weight.T` would), else in
    `hidden`'s dtype; softmax and loss in float32.
    """
    compute_dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else hidden.dtype
    if hidden.device.type != "cpu" and torch.is_autocast_enabled(hidden.device.type):
        compute_dtype = torch.get_autocast_dtype(hidden.device.type)
    shape = teacher_ids.shape[:-1]
    probs = teacher_probs.float()
    probs = probs / probs.sum(-1, keepdim=True).clamp_min(1e-12)
    cross_entropy, top1 = _CandidateCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight.detach(), teacher_ids.reshape(-1, teacher_ids.shape[-1]),
        probs.reshape(-1, probs.shape[-1]), compute_dtype, chunk_rows,
    )
    return _reduce_per_depth(cross_entropy.view(shape), top1.view(shape) == teacher_ids[..., 0], valid, weights)
