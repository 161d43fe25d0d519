"""Step 3 of a round, accept: the target's own token at each reached tree node (greedy, sampling, logits processors
with a per-row copy where they index the batch), and which rows of the target's lm_head one call computes."""

from __future__ import annotations

import copy
import time

import torch
from transformers import LogitsProcessorList
from transformers.generation.logits_process import (
    EncoderNoRepeatNGramLogitsProcessor,
    EncoderRepetitionPenaltyLogitsProcessor,
    PrefixConstrainedLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
)

from .packed_linear import transposed_linear
from .projection import ProjectionCost


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


# Rows a call asks `ExactArgmax` for at most (its bf16 pass is about flat up to there on the CPUs measured). Where it
# exists it serves every call, however few the rows: on the 2-core AVX-512-BF16 box one fp32 row of SmolLM2's lm_head
# took 14 ms, three 44 ms, against 6-7 ms for the bf16 pass with 1 to 8 rows.
ARGMAX_MAX_ROWS = 64


def accept_round(trees, node_hidden: torch.Tensor, emit, lm_head, projection: ProjectionCost,
                 argmax=None) -> tuple[list[list[int]], float]:
    """Step 3 of a round: each row follows the target's own token from its root while a child carries it (the token
    where no child does is the target's own next token).

    Greedy without processors: `argmax` ([`ExactArgmax`]) over every node the waiting rows may reach, in one call.
    Else `lm_head` over every waiting row's main chain at once, padded to the cheapest measured row count with the
    likeliest other nodes (see `projection.py`). Again only where a row's path leaves the rows computed.

    Args:
        trees (`list[DraftTree]`): the round's trees, one per row.
        node_hidden (`torch.Tensor` of shape `(rows, n, hidden)`): the verify forward's last hidden states.
        emit (`Callable`): `emit(i, logits_or_token, draft_tokens) -> (token, stop)` for row `i` at its current node.
        lm_head (`Callable`): the target's logits of hidden states (its logit transform included; a
            [`TargetLogits`], given `transposed_linear` as its product where `projection` measured that faster).
        projection ([`ProjectionCost`]): the lm_head's measured cost against rows.
        argmax ([`ExactArgmax`], *optional*): greedy tokens without the logits.

    Returns:
        `(accepted, seconds)`: each row's accepted drafted nodes in order, and the seconds spent in `lm_head`/`argmax`.
    """
    device = node_hidden.device
    rows = len(trees)
    seconds = 0.0
    nodes = [0] * rows
    accepted: list[list[int]] = [[] for _ in range(rows)]
    node_logits: list[dict[int, torch.Tensor | int]] = [{} for _ in range(rows)]
    waiting = list(range(rows))
    while waiting:
        started = time.perf_counter()
        if argmax is not None:  # flat in the rows: every node the waiting rows may reach, in one call
            wanted = projection_rows(trees, waiting, nodes, node_logits, None)
            logits = argmax(node_hidden[torch.tensor([i for i, _ in wanted], device=device),
                                        torch.tensor([node for _, node in wanted], device=device)]).tolist()
        else:
            wanted = projection_rows(trees, waiting, nodes, node_logits, projection)
            padded = projection.padded_rows(len(wanted))
            repeats = [wanted[-1]] * (padded - len(wanted))  # to the cheaper count
            hidden = node_hidden[torch.tensor([i for i, _ in wanted + repeats], device=device),
                                 torch.tensor([node for _, node in wanted + repeats], device=device)]
            logits = lm_head(hidden, transposed_linear) if projection.runs_transposed(padded) else lm_head(hidden)
        seconds += time.perf_counter() - started
        for (i, node), row_logits in zip(wanted, logits):
            node_logits[i][node] = row_logits
        still = []
        for i in waiting:
            while True:
                node = nodes[i]
                if node not in node_logits[i]:
                    still.append(i)
                    break
                token, stop = emit(i, node_logits[i][node], trees[i].child_tokens(node))
                child = trees[i].child_with_token(node, token)
                if stop or child is None:
                    break
                accepted[i].append(child)
                nodes[i] = child
        waiting = still
    return accepted, seconds


def row_processor(processor, row: int):
    """`processor` as it acts on batch row `row` when called with that row's `(1, length)` sequence alone: a copy
    holding the row's entry where it keeps one per batch row (the repetition penalty's `prompt_ignore_length`, the
    encoder-side penalty's and n-gram block's prompt ids), or calling `prefix_allowed_tokens_fn` with the row's own
    batch id; else the processor itself."""
    if isinstance(processor, RepetitionPenaltyLogitsProcessor) and isinstance(processor.prompt_ignore_length,
                                                                                torch.Tensor):
        row_copy = copy.copy(processor)
        row_copy.prompt_ignore_length = processor.prompt_ignore_length[row : row + 1]
    elif isinstance(processor, EncoderRepetitionPenaltyLogitsProcessor):
        row_copy = copy.copy(processor)
        row_copy.encoder_input_ids = processor.encoder_input_ids[row : row + 1]
    elif isinstance(processor, EncoderNoRepeatNGramLogitsProcessor):
        row_copy = copy.copy(processor)
        row_copy.batch_size, row_copy.generated_ngrams = 1, [processor.generated_ngrams[row]]
    elif isinstance(processor, PrefixConstrainedLogitsProcessor):
        if processor._num_beams != 1:
            raise ValueError("Batched JetSpec decoding runs one sequence per prompt (num_beams=1).")
        allowed = processor._prefix_allowed_tokens_fn
        row_copy = copy.copy(processor)
        row_copy._prefix_allowed_tokens_fn = lambda batch_id, sentence: allowed(row, sentence)
    else:
        return processor
    return row_copy



def row_logits_processors(logits_processor: LogitsProcessorList, batch_size: int) -> list[LogitsProcessorList]:
    """One processor list per row, each called with that row's `(1, length)` sequence (see [`row_processor`])."""
    return [LogitsProcessorList(row_processor(processor, row) for processor in logits_processor)
            for row in range(batch_size)]



def projection_rows(
    trees: list[DraftTree],
    waiting: list[int],
    nodes: list[int],
    done: list[dict[int, torch.Tensor]],
    projection: ProjectionCost | None,
) -> list[tuple[int, int]]:
    """The `(row, node)` pairs whose target logits the next lm_head call computes: each waiting row's main chain from
    its current node (logits not in `done[row]`), then, up to [`ProjectionCost.padded_rows`] of that (`projection=None`:
    up to `ARGMAX_MAX_ROWS`), the other nodes below the waiting rows' current nodes, likeliest first (highest
    `tree.scores`, else the tree's order)."""
    wanted = [(i, node) for i in waiting for node in trees[i].main_chain(nodes[i]) if node not in done[i]]
    room = (ARGMAX_MAX_ROWS if projection is None else projection.padded_rows(len(wanted))) - len(wanted)
    if room > 0:
        chosen = set(wanted)
        extra = [
            (i, node)
            for i in waiting
            for node in trees[i].ancestor_mask[:, nodes[i]].nonzero().flatten().tolist()  # the current node's subtree
            if node not in done[i] and (i, node) not in chosen
        ]
        extra.sort(key=lambda pair: -trees[pair[0]].scores[pair[1]] if trees[pair[0]].scores is not None else pair[1])
        wanted += extra[:room]
    return wanted
