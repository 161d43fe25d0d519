"""Step 3 of a round, accept: the target's own token at each reached tree node (greedy, sampling, logits processors),
and which rows of the target's lm_head one call computes."""

from __future__ import annotations

import torch


def choose_token(scores: torch.Tensor, do_sample: bool, draft_tokens: list[int]) -> torch.LongTensor:
    """The target's token at a tree node: argmax (greedy) or one sample of `softmax(scores)` (sampling), `scores`
    being the target's logits for this node's own path after every logits processor and warper.

    `draft_tokens` (the node's children) play no part: the token is drawn from the target's distribution alone, and
    the tree only decides how far one verify forward gets. That is why output is exactly the target's (token for
    token under greedy, in distribution under sampling; with the same seed, the same tokens as plain sampling up to
    floating-point ties) -- the rule a lossy "typical acceptance" would change.
    """
    if do_sample:
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
    return scores.argmax(dim=-1)


def lm_head_chunk(device: torch.device) -> int | None:
    """Rows of the target's lm_head computed at once while accepting (`None`: a whole main chain).

    On a CPU more than three rows of a big-vocabulary lm_head cost far more than one (fp32 `linear` switches kernels
    at four rows; SmolLM2's 49k x 576 lm_head read from memory on the 2-core x86 box: 4.5 ms for 1 row, 5.1 ms for 3,
    8.4 ms for 4), so rows go three at a time. On a GPU the rows are nearly free: the whole chain goes at once.
    """
    return None if device.type == "cuda" else 3


ARGMAX_ROWS = 32  # tree rows per `ExactArgmax` call: its bf16 pass costs about the same for 1 to 32 rows


def rows_to_project(tree, node: int, done, rows: int | None) -> list[int]:
    """The tree rows whose target logits one lm_head call computes when `node`'s are needed: `node`, then the nodes
    below it most likely to be reached (highest `tree.scores`, else the first in the tree's order) whose logits are
    not in `done`, `rows` in all; with `rows=None`, `node`'s main chain."""
    if rows is None:
        return tree.main_chain(node)
    below = tree.ancestor_mask[node + 1 :, node].nonzero().flatten().add(node + 1).tolist() if rows > 1 else []
    below = [other for other in below if other not in done]
    if tree.scores is not None:
        below.sort(key=lambda other: -tree.scores[other])  # stable: ties keep the tree's order
    return [node, *below[: rows - 1]]
