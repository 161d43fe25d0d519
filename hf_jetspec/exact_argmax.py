"""The target's greedy token from a bfloat16 pass over its `lm_head`, made exact by an error bound and an fp32 recheck.

Greedy acceptance needs only `argmax(h @ W.T)` per tree node, not the logits. On a CPU with AMX tiles a bf16 `lm_head`
costs about what one fp32 row does, flat in the rows: SmolLM2's 49k x 576 `lm_head` with the weights out of cache on
the 2-core x86 box takes 4.2 ms in bf16 for 16 rows against 9.7 ms in fp32 (10.6 ms for 8).

The bf16 logit `a_t` of token `t` differs from the exact `h . w_t` by at most
`b_t = ERROR_UNITS * u * |h| * |w_t|` (`u = 2^-8`, bf16's unit roundoff: rounding `h` and `w_t` costs `(2u + u^2)
sum |h_i w_i|`, the bf16 output one more `u (1 + u)^2 |h| |w_t|`, fp32 accumulation over a few thousand terms far
less; `sum |h_i w_i| <= |h| |w_t|`). So the exact argmax is among the tokens with `a_t + b_t >= max_s (a_s - b_s)`:
[`ExactArgmax`] recomputes those few in fp32 and takes their argmax (the smallest token id among equals, as
`torch.argmax` does). A row with more than `max_candidates` such tokens (a flat distribution) gets its full fp32 row.
The token is the one the fp32 `lm_head` picks, up to floating-point rounding of the fp32 logits themselves (which any
batch shape already changes).

Used only for greedy rows without logits processors; everything else needs the full fp32 logits.
"""

from __future__ import annotations

import weakref

import torch

from .draft_vocab import projection_dtype

ERROR_UNITS = 4.0  # > 3.02 units of roundoff: the bound above, with room for fp32 accumulation
DEFAULT_MAX_CANDIDATES = 512

_BUILT: "weakref.WeakKeyDictionary[torch.nn.Module, ExactArgmax]" = weakref.WeakKeyDictionary()


def bf16_matmul_is_fast(device: torch.device) -> bool:
    """Whether a bf16 `lm_head` beats fp32 here: CPUs with native bf16 matmuls, measured (see `draft_vocab.py`)."""
    return projection_dtype(device, torch.float32) == torch.bfloat16


class ExactArgmax:
    """`argmax(lm_head(hidden), -1)` per row from a bf16 screening pass plus an fp32 recheck of the close tokens.

    Args:
        lm_head (`torch.nn.Linear`): the target's output projection (fp32 weight of shape `(vocab, hidden)`).
        max_candidates (`int`): most close tokens per call rechecked in fp32; beyond, the full fp32 rows are used.
    """

    def __init__(self, lm_head: torch.nn.Linear, max_candidates: int = DEFAULT_MAX_CANDIDATES):
        weight = lm_head.weight.detach()
        if weight.dtype != torch.float32:
            raise ValueError(f"ExactArgmax screens an fp32 lm_head, got {weight.dtype}")
        # no reference to `lm_head` itself: the module is this object's key in `_BUILT` (a weak one), which a strong
        # reference from the value would keep alive with its whole target (found by the soak test)
        self.weight = weight
        self.bias = None if getattr(lm_head, "bias", None) is None else lm_head.bias.detach().float()
        self.low = weight.to(torch.bfloat16).contiguous()
        self.norms = weight.norm(dim=1)
        self.unit = 2.0**-8
        self.max_candidates = max_candidates
        self.key = (weight.data_ptr(), weight._version)
        self.fallbacks = 0  # rows whose full fp32 logits were needed

    @torch.no_grad()
    def __call__(self, hidden: torch.Tensor) -> torch.LongTensor:
        """Token ids `(rows,)` for `hidden` of shape `(rows, hidden_size)`."""
        hidden = hidden.float()
        approx = torch.nn.functional.linear(hidden.to(torch.bfloat16), self.low).float()
        if self.bias is not None:
            approx += self.bias
        bound = (ERROR_UNITS * self.unit) * hidden.norm(dim=1, keepdim=True) * self.norms
        floor = (approx - bound).max(dim=1, keepdim=True).values
        close = approx + bound >= floor  # (rows, vocab): the tokens that may be a row's exact argmax
        candidates = close.any(0).nonzero().flatten()
        if candidates.numel() > self.max_candidates:
            self.fallbacks += hidden.shape[0]
            return torch.nn.functional.linear(hidden, self.weight, self.bias).argmax(dim=-1)
        exact = hidden @ self.weight.index_select(0, candidates).T
        if self.bias is not None:
            exact += self.bias[candidates]
        exact.masked_fill_(~close[:, candidates], float("-inf"))
        return candidates[exact.argmax(dim=-1)]


def exact_argmax_for(model) -> ExactArgmax | None:
    """The model's cached [`ExactArgmax`] (rebuilt when its `lm_head` weight changes), or `None` where a bf16 pass
    would not be faster (GPU, no AMX) or the `lm_head` is not an fp32 `Linear`."""
    lm_head = model.get_output_embeddings()
    weight = getattr(lm_head, "weight", None)
    if weight is None or weight.dtype != torch.float32 or not bf16_matmul_is_fast(weight.device):
        return None
    cached = _BUILT.get(lm_head)
    if cached is None or cached.key != (weight.data_ptr(), weight._version):
        cached = _BUILT[lm_head] = ExactArgmax(lm_head)
    return cached
