"""The draft's output projection: depth logits over the head's draft vocabulary, in the fastest dtype for the device.

A head drafts proposals only. Every node's token is the target's own (argmax or a sample of the target's
distribution, see `accept.choose_token`), so what the projection computes changes which tokens a tree offers, never
the output. Two savings follow, both lossless:

- a draft vocabulary: the head scores only the tokens the target actually writes (the most frequent ones in the
  target's on-policy responses, stored with the head as `draft_vocab`), e.g. 8k of SmolLM2's 49k;
- a bfloat16 copy of those `lm_head` rows on CPUs where a bf16 product measures faster (AMX tiles, AVX-512 BF16; the
  head's own dtype elsewhere): there the bf16 product of a few rows is about 4x faster than the fp32 one.

Measured on the 2-core x86 CPU box (AMX), default target and its shipped head, budget 8 (7 drafted depths), 3 GSM8K
prompts: the draft took 17.3 ms per round with the fp32 lm_head over all 49k tokens, 8.8 ms with a bf16 copy, 5.7 ms
with a bf16 copy of a 16k-token draft vocabulary; tau 1.97 / 1.97 / 1.99.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .cpu import bf16_paths_on
from .target_logits import softcap


def projection_dtype(device: torch.device, head_dtype: torch.dtype) -> torch.dtype:
    """bfloat16 on CPUs where a bf16 `lm_head`-sized matmul measures faster than fp32 (native bf16: AMX tiles or
    AVX-512 BF16; see `cpu.bf16_matmul_speedup`, which the process's ISA caps also govern); the head's dtype elsewhere."""
    if device.type == "cpu" and head_dtype == torch.float32 and bf16_paths_on():
        return torch.bfloat16
    return head_dtype


class DraftProjection:
    """Depth log-probs over a draft vocabulary from the head's final hidden states.

    Args:
        weight (`torch.Tensor` of shape `(vocab_size, hidden)`): the target's `lm_head` weight.
        token_ids (`torch.LongTensor` of shape `(draft_vocab_size,)`, *optional*): the draft vocabulary (increasing
            token ids); all tokens when `None`.
        dtype (`torch.dtype`): dtype of the projection (its own copy of the rows).
    """

    def __init__(self, weight: torch.Tensor, token_ids: torch.LongTensor | None, dtype: torch.dtype,
                 softcap: float | None = None):
        self.softcap = softcap
        rows = weight.detach() if token_ids is None else weight.detach().index_select(0, token_ids.to(weight.device))
        self.weight = rows.to(dtype).contiguous()
        self.token_ids = None if token_ids is None else token_ids.to(weight.device)

    def logprobs(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`(..., hidden)` -> float32 log-probs `(..., draft_vocab_size)` (columns in `token_ids` order)."""
        # one 2-D `linear`: a 3-D bf16 input (or a transposed `@ weight.T`) misses oneDNN's fast path on CPU (30x slower)
        rows = hidden_states.reshape(-1, hidden_states.shape[-1]).to(self.weight.dtype)
        logits = torch.nn.functional.linear(rows, self.weight).float()
        logits = softcap(logits, self.softcap)  # the target's final-logit softcapping (Gemma 2/3), if any
        return logits.log_softmax(dim=-1).view(*hidden_states.shape[:-1], -1)


def draft_projection(head) -> DraftProjection:
    """The bound head's [`DraftProjection`], built once per target `lm_head` weight (and its in-place version),
    draft vocabulary and dtype."""
    _, lm_head = head._bound()
    weight = lm_head.weight
    token_ids = head.draft_vocab
    dtype = projection_dtype(weight.device, head.dtype)
    softcap = head.config.final_logit_softcapping
    key = (weight.data_ptr(), weight._version, weight.device, dtype,
           None if token_ids is None else (token_ids.data_ptr(), token_ids._version), softcap)
    cached = getattr(head, "_draft_projection", None)
    if cached is None or cached[0] != key:
        cached = (key, DraftProjection(weight, token_ids, dtype, softcap))
        head._draft_projection = cached
    return cached[1]


def token_counts(sequences: Iterable[list[int]], vocab_size: int) -> torch.LongTensor:
    """How often each token id occurs in `sequences` (e.g. the target's responses), `(vocab_size,)`."""
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for tokens in sequences:
        if tokens:
            ids = torch.as_tensor(tokens, dtype=torch.long)
            if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
                raise ValueError(f"token ids must lie in [0, {vocab_size}), got {int(ids.min())}..{int(ids.max())}")
            counts += torch.bincount(ids, minlength=vocab_size)
    return counts


def select_draft_vocab(counts: torch.LongTensor, size: int, always: Iterable[int] = ()) -> torch.LongTensor:
    """The `size` most frequent token ids of `counts` (ties by lower id), `always` included (e.g. EOS), increasing.

    Raises:
        `ValueError`: `size` out of range, or smaller than the tokens that must be kept.
    """
    vocab_size = counts.numel()
    always = sorted({int(token) for token in always})
    if not 1 <= size <= vocab_size or len(always) > size:
        raise ValueError(f"draft vocabulary size must lie in [max(1, {len(always)}), {vocab_size}], got {size}")
    if any(not 0 <= token < vocab_size for token in always):
        raise ValueError(f"token ids to keep must lie in [0, {vocab_size}), got {always}")
    score = counts.double().clone()
    score[always] = float("inf")
    # stable sort by descending count keeps lower ids first among equals
    order = torch.sort(-score, stable=True).indices[:size]
    return order.sort().values


def coverage(counts: torch.LongTensor, token_ids: torch.LongTensor) -> float:
    """Fraction of the counted tokens that lie in `token_ids`."""
    total = int(counts.sum())
    return float(counts[token_ids].sum()) / total if total else 0.0


def depth_logprobs(head, output, depth: int) -> tuple[torch.Tensor, torch.LongTensor | None]:
    """Log-probs of drafted depths `1 .. depth` from a head forward run with `logits_to_keep=False` over one block
    (of at least `depth + 1` rows) per row: `((batch, depth, draft vocab), token ids of the columns or None)`.

    A head whose forward returns logits anyway (a subclass, e.g. a test oracle) is taken at its word (whole vocabulary).
    """
    if output.logits is not None:
        logits = output.logits.reshape(output.logits.shape[0], -1, output.logits.shape[-1])[:, :depth]
        return logits.float().log_softmax(dim=-1), None
    projection = draft_projection(head)
    rows = output.last_hidden_state.shape[0]
    drafted = output.last_hidden_state.view(rows, -1, output.last_hidden_state.shape[-1])[:, 1 : 1 + depth]
    return projection.logprobs(drafted), projection.token_ids
