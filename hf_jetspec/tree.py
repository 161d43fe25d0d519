"""Draft trees as data: best-first construction from per-depth log-probs, and the tensors verification needs."""

from __future__ import annotations

import dataclasses
import heapq
import math
from dataclasses import dataclass, field

import torch

from hf_jetspec_kernels.reference import pack_ancestor_mask

from .masks import additive_mask


@dataclass(frozen=True)
class DraftTree:
    """A token tree rooted at the last committed token, nodes listed parents-first.

    Args:
        tokens (`torch.LongTensor` of shape `(num_nodes,)`): node tokens; `tokens[0]` is the root.
        parents (`list[int]`): parent index of each node; `-1` for the root.
        depths (`torch.LongTensor` of shape `(num_nodes,)`): 0 for the root, parent depth + 1 otherwise.
        ancestor_mask (`torch.BoolTensor` of shape `(num_nodes, num_nodes)`): `[i, j]` is True when node `j` is
            node `i` or one of its ancestors.
    """

    tokens: torch.LongTensor
    parents: list[int]
    depths: torch.LongTensor
    ancestor_mask: torch.BoolTensor
    children: list[dict[int, int]] = field(repr=False)  # per node: child token -> child index, most likely first
    scores: list[float] | None = field(default=None, repr=False)  # per node: the head's path log-prob (root: 0)
    head_size: int | None = None  # nodes 0 .. head_size - 1 came from the head (best-first); None: all of them
    lookup_nodes: tuple[int, ...] = ()  # the merged prompt-lookup chain, node per depth (see `merge_chain`)

    @property
    def num_nodes(self) -> int:
        return len(self.parents)

    def child_with_token(self, node: int, token: int) -> int | None:
        """Index of the child of `node` that carries `token`, or `None`."""
        return self.children[node].get(token)

    def child_tokens(self, node: int) -> list[int]:
        """Tokens of `node`'s children, most likely first."""
        return list(self.children[node])

    def main_chain(self, node: int) -> list[int]:
        """`node`, then its first child, that child's first child, ... down to a leaf. Best-first trees list a node's
        most likely child first, so this is the path the head expects the target to take from `node`."""
        chain = [node]
        while self.children[chain[-1]]:
            chain.append(next(iter(self.children[chain[-1]].values())))
        return chain

    def path_tokens(self, node: int) -> list[int]:
        """Tokens from the root's first child down to `node` (the root itself excluded)."""
        path = []
        while node > 0:
            path.append(int(self.tokens[node]))
            node = self.parents[node]
        return path[::-1]

    def prefix(self, num_nodes: int) -> "DraftTree":
        """The tree of the first `num_nodes` nodes. Nodes are listed parents-first, so any prefix is a tree; for a
        best-first tree it is the best tree of that size."""
        if num_nodes >= self.num_nodes:
            return self
        if self.lookup_nodes:
            raise ValueError("take a prefix of the head's tree before merging a prompt-lookup chain into it")
        if num_nodes < 1:
            raise ValueError(f"a tree prefix needs at least the root, got num_nodes={num_nodes}")
        children = [{token: child for token, child in kids.items() if child < num_nodes} for kids in self.children[:num_nodes]]
        return DraftTree(
            tokens=self.tokens[:num_nodes],
            parents=self.parents[:num_nodes],
            depths=self.depths[:num_nodes],
            ancestor_mask=self.ancestor_mask[:num_nodes, :num_nodes],
            children=children,
            scores=None if self.scores is None else self.scores[:num_nodes],
        )

    @property
    def num_head_nodes(self) -> int:
        """Nodes drafted by the head (root included): the best-first part, before any merged prompt-lookup nodes."""
        return self.num_nodes if self.head_size is None else self.head_size

    def attention_mask(self, past_length: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask `(1, 1, num_nodes, past_length + num_nodes)`: every node sees the whole prefix, itself and its
        ancestors only."""
        allowed = torch.cat(
            [torch.ones(self.num_nodes, past_length, dtype=torch.bool, device=self.tokens.device), self.ancestor_mask],
            dim=1,
        )
        return additive_mask(allowed[None], dtype)

    def position_ids(self, past_length: int) -> torch.LongTensor:
        """`(1, num_nodes)` positions: the root sits at `past_length`, a node at depth d at `past_length + d`."""
        return (past_length + self.depths)[None]

    def packed_ancestor_bits(self) -> torch.IntTensor:
        """`ancestor_mask` packed 32 columns to an int32 word, `(num_nodes, ceil(num_nodes / 32))`: what the
        `"jetspec_tree"` attention takes instead of a dense mask."""
        return pack_ancestor_mask(self.ancestor_mask)


def tree_from_parents(
    tokens: list[int], parents: list[int], device: torch.device | str = "cpu", scores: list[float] | None = None
) -> DraftTree:
    """Builds a [`DraftTree`] from parents-first lists (`parents[0] == -1`, `parents[i] < i`), with optional per-node
    path log-probs `scores`."""
    if not tokens or parents[0] != -1 or any(not 0 <= p < i for i, p in enumerate(parents) if i > 0):
        raise ValueError("a tree needs a root at index 0 and every parent listed before its children")
    num_nodes = len(tokens)
    depths = [0] * num_nodes
    ancestor = torch.eye(num_nodes, dtype=torch.bool)
    children = [{} for _ in range(num_nodes)]
    for i in range(1, num_nodes):
        parent = parents[i]
        depths[i] = depths[parent] + 1
        ancestor[i] |= ancestor[parent]
        children[parent].setdefault(tokens[i], i)
    return DraftTree(
        tokens=torch.tensor(tokens, dtype=torch.long, device=device),
        parents=list(parents),
        depths=torch.tensor(depths, dtype=torch.long, device=device),
        ancestor_mask=ancestor.to(device),
        children=children,
        scores=scores,
    )


def chain_path(tree: DraftTree, chain: list[int]) -> list[int]:
    """The nodes that carry `chain` from the root down (depths 1, 2, ...), as far as the tree holds its tokens."""
    path, node = [], 0
    for token in chain:
        node = tree.child_with_token(node, int(token))
        if node is None:
            break
        path.append(node)
    return path


def merge_chain(tree: DraftTree, chain: list[int], chain_probabilities: list[float] | None = None) -> DraftTree:
    """`tree` with a chain of tokens (a prompt-lookup proposal for depths 1, 2, ...) merged in from the root.

    The chain follows the tree's nodes while they carry its tokens ([`chain_path`]) and continues as new nodes,
    appended after the tree's own (so the head's best-first nodes keep their indices, and each node's existing
    children stay listed first). The result's `lookup_nodes` is the chain's node at every depth, shared or new; a new
    node at depth `d` scores `log(chain_probabilities[d - 1])` (its chance of being reached), `-inf` without them.
    """
    if tree.lookup_nodes:
        raise ValueError("this tree already holds a prompt-lookup chain")
    if not chain:
        return tree
    tokens, parents = tree.tokens.tolist(), list(tree.parents)
    scores = None if tree.scores is None else list(tree.scores)
    path = chain_path(tree, chain)
    for depth in range(len(path), len(chain)):
        parents.append(path[-1] if path else 0)
        tokens.append(int(chain[depth]))
        if scores is not None:
            scores.append(float("-inf") if chain_probabilities is None
                          else math.log(max(chain_probabilities[depth], 1e-30)))
        path.append(len(tokens) - 1)
    merged = tree_from_parents(tokens, parents, device=tree.tokens.device, scores=scores)
    return dataclasses.replace(merged, head_size=tree.num_head_nodes, lookup_nodes=tuple(path))


def build_tree(
    root_token: int, depth_logprobs: torch.Tensor, budget: int, topk: int, token_ids: torch.LongTensor | None = None
) -> DraftTree:
    """Best-first tree under a node budget ("accum_logp").

    Every depth `d` offers the same top-`topk` tokens to all parents at depth `d - 1` (independent marginals); a
    path's score is the sum of its tokens' log-probs. Nodes are popped from a heap by score until `budget` nodes
    (root included) are taken. Children are pushed lazily (first child, then next sibling), so each pop costs O(log n).

    Args:
        root_token (`int`): the last committed token, not yet seen by the target.
        depth_logprobs (`torch.FloatTensor` of shape `(max_depth, vocab_size)`): log-probs of depth 1 .. max_depth.
        budget (`int`): total nodes including the root (1 means no drafting).
        topk (`int`): candidates per depth.
        token_ids (`torch.LongTensor` of shape `(vocab,)`, *optional*): the token id of each column of
            `depth_logprobs` (a draft vocabulary, see `draft_vocab.py`); column `i` is token `i` when `None`.

    Returns:
        [`DraftTree`] with at most `budget` nodes, parents listed before children, and `scores` (path log-probs,
        non-increasing: a node's score never exceeds its parent's or an earlier-popped node's).
    """
    if budget < 1 or topk < 1:
        raise ValueError(f"tree budget and topk must be >= 1, got budget={budget}, topk={topk}")
    max_depth = depth_logprobs.shape[0]
    values, ids = depth_logprobs.float().topk(min(topk, depth_logprobs.shape[-1]), dim=-1)
    if token_ids is not None:
        ids = token_ids[ids]
    values, ids = values.tolist(), ids.tolist()
    width = len(values[0]) if max_depth else 0

    tokens, parents, scores = [root_token], [-1], [0.0]
    # heap entries: (-score, tie, depth (1-based), parent index, rank at that depth, parent score)
    heap = [(-values[0][0], 0, 1, 0, 0, 0.0)] if max_depth and budget > 1 else []
    tie = 1
    while heap and len(tokens) < budget:
        neg_score, _, depth, parent, rank, parent_score = heapq.heappop(heap)
        node = len(tokens)
        tokens.append(ids[depth - 1][rank])
        parents.append(parent)
        scores.append(-neg_score)
        if rank + 1 < width:  # next sibling
            heapq.heappush(heap, (-(parent_score + values[depth - 1][rank + 1]), tie, depth, parent, rank + 1, parent_score))
            tie += 1
        if depth < max_depth:  # first child
            heapq.heappush(heap, (neg_score - values[depth][0], tie, depth + 1, node, 0, -neg_score))
            tie += 1
    return tree_from_parents(tokens, parents, device=depth_logprobs.device, scores=scores)
