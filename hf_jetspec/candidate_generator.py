"""`JetSpecCandidateGenerator`: Transformers' `CandidateGenerator` interface, drafting a token tree per round."""

from __future__ import annotations

import torch
from transformers.generation.candidate_generator import CandidateGenerator

from .budget import AutoBudget
from .draft_vocab import depth_logprobs
from .lookup import PromptLookupDraft
from .modeling_jetspec import JetSpecContextCache, JetSpecHead
from .settings import resolve_tree_budget
from .tree import DraftTree, build_tree, merge_chain


class JetSpecCandidateGenerator(CandidateGenerator):
    """Drafts one [`DraftTree`] per round with a [`JetSpecHead`].

    The head's context (fused tap hidden states of committed positions) is fed by the decoding loop through
    [`add_context`] after every target forward, so drafting never needs a target forward of its own.

    Args:
        head ([`JetSpecHead`]): the draft head, already bound to the target.
        tree_budget (`int` or `"auto"`): nodes per tree, root included (1 disables drafting); `"auto"` sizes each
            round's tree with `auto_budget`.
        tree_topk (`int`): candidate tokens per depth.
        auto_budget ([`AutoBudget`], *optional*): required with `tree_budget="auto"`.
        prompt_lookup ([`PromptLookupDraft`], *optional*): merges a prompt-lookup proposal into every tree (cut to
            the length that pays under `"auto"`, whole with a fixed budget), also in rounds where the head does not
            draft.
    """

    def __init__(self, head: JetSpecHead, tree_budget: int | str, tree_topk: int, auto_budget: AutoBudget | None = None,
                 prompt_lookup: PromptLookupDraft | None = None):
        tree_budget = resolve_tree_budget(tree_budget)
        if tree_topk < 1:
            raise ValueError(f"`tree_topk` must be >= 1, got {tree_topk}")
        if tree_budget == "auto" and auto_budget is None:
            raise ValueError("tree_budget='auto' needs an `auto_budget` (an `AutoBudget` with a measured verify cost)")
        self.head = head
        self.tree_budget = tree_budget
        self.tree_topk = tree_topk
        self.auto_budget = auto_budget if tree_budget == "auto" else None
        self.prompt_lookup = prompt_lookup
        self.context_cache = JetSpecContextCache()
        self._pending_features: list[torch.Tensor] = []
        self._pending_positions: list[torch.Tensor] = []
        self.drafted = False  # whether the last `get_candidates` ran the head

    @property
    def target_layer_ids(self) -> list[int]:
        return self.head.config.target_layer_ids

    def add_context(self, features: torch.Tensor, position_ids: torch.LongTensor) -> None:
        """Queues context rows for the next draft.

        Args:
            features (`torch.Tensor` of shape `(1, n, K * hidden)`): concatenated tap hidden states.
            position_ids (`torch.LongTensor` of shape `(1, n)`): their positions (contiguous, after the cached ones).
        """
        if self.tree_budget == 1:  # the head never drafts
            return
        self._pending_features.append(features)
        self._pending_positions.append(position_ids)

    @torch.no_grad()
    def get_candidates(self, input_ids: torch.LongTensor) -> tuple[DraftTree, None]:
        """Drafts a tree rooted at `input_ids[0, -1]` (the last committed token, not yet seen by the target).

        Args:
            input_ids (`torch.LongTensor` of shape `(1, sequence_length)`): all committed tokens.

        Returns:
            `(DraftTree, None)`: the tree (no candidate logits: acceptance is greedy/sampled from the target alone).
        """
        root = int(input_ids[0, -1])
        self.drafted = False
        chain, chain_probabilities = self.prompt_lookup.propose(input_ids) if self.prompt_lookup else ([], [])
        if self.tree_budget == 1 or (self.auto_budget is not None and not self.auto_budget.should_draft()):
            tree = build_tree(root, torch.zeros(0, 1, device=input_ids.device), 1, 1)  # a plain step, or a chain
            if self.auto_budget is not None and chain:
                return self.auto_budget.choose_tree(tree, chain, chain_probabilities, drafted=False), None
            return merge_chain(tree, chain, chain_probabilities), None
        features = positions = None
        if self._pending_features:
            features = torch.cat(self._pending_features, dim=1).to(self.head.dtype)
            positions = torch.cat(self._pending_positions, dim=1)
            self._pending_features, self._pending_positions = [], []
        anchor_position = input_ids.shape[1] - 1
        self.drafted = True
        budget = self.tree_budget if self.auto_budget is None else self.auto_budget.draft_budget()
        depth = min(self.head.config.block_size - 1, budget - 1)  # a tree of n nodes is at most n - 1 deep
        output = self.head(
            anchor_ids=input_ids[:, -1:],
            anchor_position_ids=torch.tensor([[anchor_position]], device=input_ids.device),
            context_features=features,
            context_position_ids=positions,
            past_key_values=self.context_cache,
            logits_to_keep=False,
            block_rows=self.head.rows_for_depth(depth),  # causal: the depths a tree of this budget reaches suffice
        )
        logprobs, token_ids = depth_logprobs(self.head, output, depth)  # (1, depth, draft vocab)
        tree = build_tree(root, logprobs[0], budget, self.tree_topk, token_ids)
        if self.auto_budget is None:
            return merge_chain(tree, chain, chain_probabilities), None
        return self.auto_budget.choose_tree(tree, chain, chain_probabilities), None

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, num_matches: int):
        """Nothing to do: with `tree_budget="auto"` the decode loop reports each round's timing to
        [`AutoBudget.observe`], which needs the verified tree and the round's seconds besides `num_matches`."""
        return
