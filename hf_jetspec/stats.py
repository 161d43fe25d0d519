"""What the last `generate(assistant_model=head)` call did: [`JetSpecGenerateStats`] (`head.last_generate_stats`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class JetSpecGenerateStats:
    """What the last `generate(assistant_model=head)` call did (`head.last_generate_stats`), one prompt or a batch
    (counts sum over rows).

    Args:
        rounds (`int`): draft-verify rounds (the prefill is not a round).
        new_tokens (`int`): tokens emitted, the prefill's token included (summed over rows, as returned).
        drafted_nodes (`int`): tree nodes drafted, roots excluded.
        draft_rounds (`int`): row-rounds in which the head drafted (under `tree_budget="auto"` it pauses while its
            drafts do not pay; see `drafting.RoundDrafts`).
        accepted_drafts (`int`): drafted tokens accepted.
        lookup_nodes (`int`), accepted_lookup (`int`): tree nodes on merged prompt-lookup proposals (shared with the
            head's or not), and how many of them were accepted (see `lookup.py`).
        tree_budget (`int` or `"auto"`), tree_topk (`int`): the tree settings used.
        time_prefill, time_draft, time_verify, time_accept, time_cache, time_total (`float`): seconds.
        batch_size (`int`): rows in the call.
        speculated (`bool`): `False` when the cost model (or `tree_budget=1` without prompt lookup) ran Transformers'
            own decoding instead; the round and token counts then stay 0.
        row_rounds (`int`): rounds summed over the rows taking part in them.
        tree_sizes (`list[int]`): nodes per row verified in each round (root included).
        accepted_lengths (`list[int]`): drafted tokens accepted in each row-round, in order (rows of a round in row
            order): their distribution shows at which depth acceptance stops.
        max_nodes (`int`): largest tree per row the call allowed.
        drafting_stopped_at (`int`, *optional*): the round after which the head first paused because its drafts did
            not pay.
        undrafted_rounds (`int`): rounds in which the head did not draft (its trees were the roots, plus proposals).
        gave_up_at (`int`, *optional*): the round from which the call verified roots alone, its recent rounds having
            made tokens slower than plain decoding's measured step (see `planning.SpeedGuard`).
        expected_speedup (`float`, *optional*): the cost model's throughput ratio vs plain decoding for this call.
    """

    rounds: int = 0
    new_tokens: int = 0
    drafted_nodes: int = 0
    accepted_drafts: int = 0
    draft_rounds: int = 0
    lookup_nodes: int = 0
    accepted_lookup: int = 0
    tree_budget: int | str = 0
    tree_topk: int = 0
    time_prefill: float = 0.0
    time_draft: float = 0.0
    time_verify: float = 0.0
    time_accept: float = 0.0
    time_cache: float = 0.0
    time_total: float = 0.0
    batch_size: int = 1
    speculated: bool = True
    row_rounds: int = 0
    tree_sizes: list[int] = field(default_factory=list)
    accepted_lengths: list[int] = field(default_factory=list)
    max_nodes: int = 0
    drafting_stopped_at: int | None = None
    undrafted_rounds: int = 0
    gave_up_at: int | None = None
    expected_speedup: float | None = None
    _drafted_accepts: int = field(default=0, repr=False)

    def count_round(self, trees, accepted: list[list[int]], drafted: bool, draft_seconds: float,
                    verify_seconds: float, accept_seconds: float, cache_seconds: float) -> None:
        """Adds one round: its verified trees, each row's accepted nodes, whether the head drafted, its timings."""
        self.rounds += 1
        self.row_rounds += len(trees)
        self.undrafted_rounds += not drafted
        self.tree_sizes.append(max(tree.num_nodes for tree in trees))
        for tree, path in zip(trees, accepted):
            self.drafted_nodes += tree.num_nodes - 1
            self.accepted_drafts += len(path)
            self.accepted_lengths.append(len(path))
            if tree.lookup_nodes:
                self.lookup_nodes += len(tree.lookup_nodes)
                self.accepted_lookup += len(set(path).intersection(tree.lookup_nodes))
        if drafted:
            self.draft_rounds += len(trees)
            self._drafted_accepts += sum(map(len, accepted))
        self.time_draft += draft_seconds
        self.time_verify += verify_seconds
        self.time_accept += accept_seconds
        self.time_cache += cache_seconds

    @property
    def mean_accepted_length(self) -> float:
        """tau: tokens per row per round (accepted drafts + the target's own token)."""
        return (self.accepted_drafts + self.row_rounds) / self.row_rounds if self.row_rounds else 0.0

    @property
    def drafted_tau(self) -> float:
        """tau over the row-rounds in which the head drafted (the head's acceptance; equals tau unless the head paused
        for some rounds)."""
        return (self._drafted_accepts + self.draft_rounds) / self.draft_rounds if self.draft_rounds else 0.0

    @property
    def mean_tree_size(self) -> float:
        """Nodes per verified tree (root included), over rows and rounds: the budget, or what `"auto"` chose."""
        return (self.drafted_nodes + self.row_rounds) / self.row_rounds if self.row_rounds else 0.0

    @property
    def time_overhead(self) -> float:
        """Host time outside the measured phases (Python bookkeeping, streamer, stopping criteria)."""
        measured = self.time_prefill + self.time_draft + self.time_verify + self.time_accept + self.time_cache
        return max(self.time_total - measured, 0.0)


JetSpecBatchStats = JetSpecGenerateStats  # the name batches' stats had before one loop served both
