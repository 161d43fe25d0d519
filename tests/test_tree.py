import itertools
import math

import pytest
import torch

from hf_jetspec import build_tree, tree_from_parents


def brute_force_best(depth_logprobs, budget, topk):
    """All prefixes of the top-k grid, scored by summed log-probs; the best `budget - 1` form a tree (prefix-closed)."""
    values, ids = depth_logprobs.topk(topk, dim=-1)
    scored = []
    for depth in range(1, depth_logprobs.shape[0] + 1):
        for ranks in itertools.product(range(topk), repeat=depth):
            score = sum(values[d, r].item() for d, r in enumerate(ranks))
            scored.append((score, tuple(ids[d, r].item() for d, r in enumerate(ranks))))
    scored.sort(key=lambda item: -item[0])
    return sorted(score for score, _ in scored[: budget - 1])


@pytest.mark.parametrize("budget,topk,depth", [(1, 3, 3), (2, 3, 3), (8, 2, 4), (20, 3, 3), (40, 4, 3)])
def test_best_first_tree_takes_the_highest_scoring_paths(budget, topk, depth):
    torch.manual_seed(budget)
    logprobs = torch.randn(depth, 12).log_softmax(-1)
    tree = build_tree(5, logprobs, budget, topk)
    assert tree.num_nodes == min(budget, 1 + sum(topk**d for d in range(1, depth + 1)))
    assert int(tree.tokens[0]) == 5 and tree.parents[0] == -1

    # scores of the drafted paths equal the brute-force best ones
    values, ids = logprobs.topk(topk, dim=-1)
    rank = {(d, ids[d, r].item()): values[d, r].item() for d in range(depth) for r in range(topk)}
    scores = []
    for node in range(1, tree.num_nodes):
        path = tree.path_tokens(node)
        scores.append(sum(rank[(d, tok)] for d, tok in enumerate(path)))
    assert [round(s, 5) for s in sorted(scores)] == [round(s, 5) for s in brute_force_best(logprobs, budget, topk)]


def test_tree_lists_parents_first_with_depths_and_ancestor_mask():
    tree = tree_from_parents([9, 1, 2, 3, 4, 5], [-1, 0, 0, 1, 3, 2])
    assert tree.depths.tolist() == [0, 1, 1, 2, 3, 2]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 0, 1, 0, 0, 0],
            [1, 1, 0, 1, 0, 0],
            [1, 1, 0, 1, 1, 0],
            [1, 0, 1, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(tree.ancestor_mask, expected)
    assert tree.child_with_token(1, 3) == 3 and tree.child_with_token(1, 2) is None
    assert tree.path_tokens(4) == [1, 3, 4]
    mask = tree.attention_mask(past_length=3, dtype=torch.float32)
    assert mask.shape == (1, 1, 6, 9)
    assert (mask[0, 0, :, :3] == 0).all()
    assert torch.equal(mask[0, 0, :, 3:] == 0, expected)
    assert tree.position_ids(3).tolist() == [[3, 4, 4, 5, 6, 5]]


@pytest.mark.parametrize("tokens,parents", [([], []), ([1, 2], [0, 0]), ([1, 2, 3], [-1, 2, 0])])
def test_malformed_trees_are_refused(tokens, parents):
    with pytest.raises(ValueError, match="parent"):
        tree_from_parents(tokens, parents)


def test_budget_and_topk_must_be_positive():
    with pytest.raises(ValueError, match="budget"):
        build_tree(0, torch.zeros(2, 4), 0, 2)


def test_chain_when_topk_is_one():
    logprobs = torch.full((4, 10), -math.inf)
    for depth, token in enumerate([3, 1, 4, 1]):
        logprobs[depth, token] = 0.0
    tree = build_tree(7, logprobs, budget=10, topk=1)
    assert tree.tokens.tolist() == [7, 3, 1, 4, 1]
    assert tree.parents == [-1, 0, 1, 2, 3]


def test_main_chain_follows_the_first_listed_child():
    #        0
    #      /   \
    #     1     2
    #    / \     \
    #   3   4     5
    #   |
    #   6
    tree = tree_from_parents([9, 1, 2, 3, 4, 5, 6], [-1, 0, 0, 1, 1, 2, 3])
    assert tree.main_chain(0) == [0, 1, 3, 6]
    assert tree.main_chain(2) == [2, 5]
    assert tree.main_chain(4) == [4]
    logprobs = torch.log_softmax(torch.randn(4, 20, generator=torch.Generator().manual_seed(0)), -1)
    best_first = build_tree(7, logprobs, budget=10, topk=3)
    chain = best_first.main_chain(0)
    # the best-first main chain is the head's top-1 token at every depth
    assert [int(best_first.tokens[n]) for n in chain[1:]] == logprobs.argmax(-1)[: len(chain) - 1].tolist()
