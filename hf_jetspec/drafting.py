"""Step 1 of a round, draft: one head forward drafts a best-first tree per row ([`BatchedDrafter`]), each row's
prompt-lookup proposal joins its tree, and the round's plan cuts the trees to the width that pays ([`RoundDrafts`]).

The head's context is per-row rows in one padded [`JetSpecContextCache`]. Rows commit different numbers of tokens per
round, so every round appends `max_accepted + 1` context rows to every row and marks the surplus invalid in a per-row
mask; the head's attention mask hides invalid rows (and, as always, rows at or after the anchor). Invalid rows are
squeezed out now and then ([`BatchedDrafter.compact`]). One row (no padding) never has invalid rows.
"""

from __future__ import annotations

import torch

import time

from .draft_vocab import depth_logprobs
from .lookup import PromptLookupDraft
from .modeling_jetspec import JetSpecContextCache, JetSpecHead
from .masks import additive_mask
from .kv_cache import squeeze_gaps, valid_first
from .tree import DraftTree, build_tree, merge_chain

# Rounds in a row in which drafting did not pay (see `BatchRoundBudget.drafting_pays`) before the head pauses for
# DRAFT_BACKOFF rounds (proposals only), doubling while the rounds after each pause still do not pay; after a pause one
# such round (a probe) is enough.
DRAFT_PATIENCE = 3
DRAFT_BACKOFF = 4
MAX_DRAFT_BACKOFF = 64


def left_align(valid: torch.BoolTensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Moves each row's valid entries (dim 1) to the front, keeping their order; returns `(valid, *tensors)` gathered
    the same way, cut to the longest row."""
    order = valid_first(valid)
    gathered = [t.gather(1, order.view(*order.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])) for t in tensors]
    return (valid.gather(1, order), *gathered)


class BatchedDrafter:
    """Drafts one best-first [`DraftTree`] per row with a single forward of a [`JetSpecHead`] over the batch.

    Gives each row the same drafts as a head forward over that row alone would (up to floating point), at the cost
    of one head forward instead of one per row. The `lm_head` runs only over the depths a tree can use.

    Args:
        head ([`JetSpecHead`]): the draft head, bound to the target.
        batch_size (`int`): rows.
        tree_topk (`int`): candidate tokens per depth.
    """

    def __init__(self, head: JetSpecHead, batch_size: int, tree_topk: int):
        if tree_topk < 1:
            raise ValueError(f"`tree_topk` must be >= 1, got {tree_topk}")
        self.head = head
        self.tree_topk = tree_topk
        self.cache = JetSpecContextCache()
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=head.device)
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add_context(self, features: torch.Tensor, position_ids: torch.LongTensor, valid: torch.BoolTensor) -> None:
        """Queues context rows for the next draft.

        Args:
            features (`torch.Tensor` of shape `(batch, n, K * hidden)`): concatenated tap hidden states.
            position_ids (`torch.LongTensor` of shape `(batch, n)`): their positions (a row's valid ones contiguous,
                right after its earlier context rows).
            valid (`torch.BoolTensor` of shape `(batch, n)`): which entries are real rows.
        """
        self._pending.append((features, position_ids, valid))

    def select_rows(self, rows: torch.LongTensor) -> None:
        """Keeps only the batch rows `rows` (finished rows leave the batch)."""
        self.cache.batch_select_indices(rows)
        if self.cache.last_context_row is not None:
            self.cache.last_context_row = self.cache.last_context_row[rows]
        self.valid = self.valid[rows]
        self._pending = [tuple(t[rows] for t in chunk) for chunk in self._pending]

    def compact(self, min_gap: int = 16, min_fraction: float = 0.25) -> None:
        """Drops invalid context slots when there are at least `min_gap` of them per row and `min_fraction` of the
        cache."""
        self.valid = squeeze_gaps(self.cache, self.valid, min_gap, min_fraction)

    @torch.no_grad()
    def draft(
        self, root_ids: torch.LongTensor, root_position_ids: torch.LongTensor, max_nodes: int, depth: int
    ) -> list[DraftTree]:
        """One tree per row, rooted at its last committed token.

        Args:
            root_ids (`torch.LongTensor` of shape `(batch,)`): each row's root (last committed token).
            root_position_ids (`torch.LongTensor` of shape `(batch,)`): its position.
            max_nodes (`int`): nodes per tree, root included.
            depth (`int`): drafted depths to compute logits for (at most `block_size - 1`).
        """
        head = self.head
        block = head.config.block_size
        depth = max(0, min(depth, block - 1, max_nodes - 1))
        features = positions = None
        new_valid = self.valid[:, :0]
        if self._pending:
            valid = torch.cat([chunk[2] for chunk in self._pending], dim=1)
            new_valid, features, positions = left_align(
                valid,
                torch.cat([chunk[0] for chunk in self._pending], dim=1).to(head.dtype),
                torch.cat([chunk[1] for chunk in self._pending], dim=1),
            )
            self._pending = []
        if head.config.anchor_context and not bool(new_valid.any(1).all()):
            raise RuntimeError("every row needs its newly committed context rows before a draft (anchor_context)")
        context_valid = torch.cat([self.valid, new_valid], dim=1)
        rows = root_ids.shape[0]
        block_rows = head.rows_for_depth(depth)  # causal: the rows past the drafted depths change nothing
        inside = torch.ones(block_rows, block_rows, dtype=torch.bool, device=root_ids.device)
        if head.config.causal_block:
            inside = inside.tril()
        allowed = torch.cat([context_valid[:, None, :].expand(-1, block_rows, -1), inside.expand(rows, -1, -1)], dim=-1)
        output = head(
            anchor_ids=root_ids[:, None],
            anchor_position_ids=root_position_ids[:, None],
            context_features=features,
            context_position_ids=positions,
            attention_mask=additive_mask(allowed, head.dtype),
            past_key_values=self.cache,
            logits_to_keep=False,
            block_rows=block_rows,
        )
        self.valid = context_valid
        roots = root_ids.tolist()
        if depth == 0:
            empty = torch.zeros(0, 1, device=root_ids.device)
            return [build_tree(root, empty, 1, 1) for root in roots]
        logprobs, token_ids = depth_logprobs(head, output, depth)  # (batch, depth, draft vocab)
        return [build_tree(root, logprobs[row], max_nodes, self.tree_topk, token_ids) for row, root in enumerate(roots)]


class RoundDrafts:
    """Each round's trees: the head's (unless it is paused), each row's prompt-lookup proposal, and the cut to the
    width that pays under `tree_budget="auto"` (a fixed budget merges whole proposals).

    When drafting does not pay for `DRAFT_PATIENCE` drafted rounds in a row, the head pauses for `DRAFT_BACKOFF`
    rounds (proposals only), the pause doubling (up to `MAX_DRAFT_BACKOFF`) while the probe rounds after it still do
    not pay. So a weak head costs a few probe rounds, not a slowdown of every round.

    Args:
        head ([`JetSpecHead`]): the bound draft head.
        batch_size (`int`): rows.
        settings ([`TreeSettings`]): the call's tree settings.
        plan ([`BatchPlan`]): the call's largest tree and drafted depth.
        round_budget ([`BatchRoundBudget`], *optional*): sizes each round's trees (`tree_budget="auto"`).
        eos_token_id, max_length: where proposals stop.
        left_padding (`list[int]`): each row's padding, which proposals leave out.
    """

    def __init__(self, head, batch_size: int, settings, plan, round_budget=None, eos_token_id=None,
                 max_length: int = 0, left_padding: list[int] | None = None):
        self.drafter = BatchedDrafter(head, batch_size, settings.tree_topk)
        self.plan, self.round_budget = plan, round_budget
        self.left_padding = left_padding or [0] * batch_size
        self.lookups = [
            PromptLookupDraft(settings.prompt_lookup_num_tokens, settings.max_matching_ngram_size,
                              eos_token_id=eos_token_id, max_length=max_length - self.left_padding[row],
                              profile=None if round_budget is None else round_budget.profile.lookup)
            for row in range(batch_size)
        ] if settings.prompt_lookup_num_tokens else None
        self.skip, self.rounds_not_paying, self.backoff, self.probing = 0, 0, DRAFT_BACKOFF, False
        self.stopped_at: int | None = None  # the round after which the head first paused
        self.rounds = 0
        self.draft_seconds = 0.0  # the head's share of the last round

    def trees(self, active: list[int], sequences: torch.LongTensor, lengths: list[int],
              root_position_ids: torch.LongTensor) -> tuple[list[DraftTree], bool]:
        """This round's tree per active row (rooted at its last token), and whether the head drafted them."""
        device = sequences.device
        roots = torch.tensor([int(sequences[row, lengths[row] - 1]) for row in active], device=device)
        chains = probabilities = None
        if self.lookups is not None:
            proposals = [self.lookups[row].propose(sequences[row : row + 1, self.left_padding[row] : lengths[row]])
                         for row in active]
            chains, probabilities = [chain for chain, _ in proposals], [odds for _, odds in proposals]
        started = time.perf_counter()
        drafting = self.skip == 0 and self.plan.depth > 0
        if drafting:
            nodes = self.plan.max_nodes
            if self.round_budget is not None:
                nodes = self.round_budget.draft_nodes(nodes)
            trees = self.drafter.draft(roots, root_position_ids, nodes, self.plan.depth)  # (depth capped to fit nodes)
        else:
            empty = torch.zeros(0, 1, device=device)
            trees = [build_tree(int(root), empty, 1, 1) for root in roots.tolist()]
        self.draft_seconds = time.perf_counter() - started
        self.rounds += 1
        if self.round_budget is not None:
            trees = self.round_budget.choose_trees(trees, chains, probabilities, drafted=drafting)
            self._back_off(drafting)
        elif chains is not None:
            trees = [merge_chain(tree, chain, odds) for tree, chain, odds in zip(trees, chains, probabilities)]
        return trees, drafting

    def _back_off(self, drafting: bool) -> None:
        if not drafting:
            self.skip = max(self.skip - 1, 0)
        elif self.round_budget.drafting_pays:
            self.rounds_not_paying, self.backoff, self.probing = 0, DRAFT_BACKOFF, False
        else:
            self.rounds_not_paying += 1
            if self.rounds_not_paying >= (1 if self.probing else DRAFT_PATIENCE):  # the drafts do not pay now
                self.skip, self.rounds_not_paying = self.backoff, 0
                self.backoff = min(2 * self.backoff, MAX_DRAFT_BACKOFF)
                self.probing = True
                if self.stopped_at is None:
                    self.stopped_at = self.rounds - 1

    def give_up(self) -> None:
        """Verifies the roots alone from now on (no head, no proposals)."""
        self.skip, self.lookups = 1 << 62, None
