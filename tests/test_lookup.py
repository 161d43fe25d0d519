"""Prompt-lookup proposals merged into the head's tree: the merge, the measured acceptance profile, the auto choice,
and the one test that matters most (output equals plain `generate()`), greedy and seeded sampling."""

import math

import pytest
import torch
from conftest import make_tiny_target

from hf_jetspec import JetSpecHead
from hf_jetspec.accept import projection_rows
from hf_jetspec.lookup import LookupProfile, PromptLookupDraft, matched_prefix, prompt_lookup_tokens
from hf_jetspec.tree import build_tree, merge_chain, tree_from_parents

# root 7; depth 1: 1 (node 1), 2 (node 2); node 1's child 3 (node 3)
TREE = tree_from_parents([7, 1, 2, 3], [-1, 0, 0, 1], scores=[0.0, math.log(0.6), math.log(0.3), math.log(0.4)])


def test_merge_chain_follows_shared_nodes_then_appends():
    merged = merge_chain(TREE, [1, 5, 6])
    assert merged.tokens.tolist() == [7, 1, 2, 3, 5, 6]
    assert merged.parents == [-1, 0, 0, 1, 1, 4]
    assert merged.lookup_nodes == (1, 4, 5) and merged.head_size == merged.num_head_nodes == 4
    assert merged.child_tokens(1) == [3, 5]  # the head's child stays first: main chains are the head's
    assert merged.scores[:4] == TREE.scores and merged.scores[4:] == [-math.inf, -math.inf]
    assert merged.ancestor_mask[5].tolist() == [True, True, False, False, True, True]
    assert merged.depths.tolist() == [0, 1, 1, 2, 2, 3]


def test_new_chain_nodes_carry_their_scores_and_the_likeliest_rows_are_projected_after_the_main_chain():
    merged = merge_chain(TREE, [1, 5, 6], [0.9, 0.5, 0.45])
    assert merged.scores[4:] == pytest.approx([math.log(0.5), math.log(0.45)])
    # the main chain first (the head's first children: 0, 1, 3), then the likeliest others: 4 (0.5), 5 (0.45), 2 (0.3)
    assert [node for _, node in projection_rows([merged], [0], [0], [{}], None)] == [0, 1, 3, 4, 5, 2]
    assert [node for _, node in projection_rows([merged], [0], [1], [{1: None}], None)] == [3, 4, 5]


def test_merge_chain_edge_cases():
    assert merge_chain(TREE, []) is TREE
    whole = merge_chain(TREE, [1, 3])  # entirely inside the tree: no new rows
    assert whole.num_nodes == 4 and whole.lookup_nodes == (1, 3)
    assert merge_chain(TREE, [9]).parents == [-1, 0, 0, 1, 0]
    with pytest.raises(ValueError, match="already holds"):
        merge_chain(whole, [1])
    with pytest.raises(ValueError, match="prefix"):
        merge_chain(TREE, [9]).prefix(2)


def test_profile_learns_per_state_and_stays_monotone():
    profile = LookupProfile(prior=(0.1, 0.3, 0.5, 0.7), prior_weight=1.0)
    assert profile.probabilities(0, 3) == pytest.approx([0.1, 0.01, 0.001])
    for _ in range(50):
        profile.observe(3, length=4, matched=3)
    high = profile.probabilities(3, 5)
    assert high[:3] == pytest.approx([1.0, 1.0, 1.0], abs=0.05) and high[3] < 0.05 and high[4] < 0.05
    assert all(a >= b for a, b in zip(high, high[1:]))
    assert profile.probabilities(0, 2) == pytest.approx([0.1, 0.01])  # other states untouched


def test_proposals_are_scored_against_what_the_target_wrote_whether_verified_or_not():
    profile = LookupProfile()
    draft = PromptLookupDraft(3, 2, eos_token_id=None, max_length=100, profile=profile)
    chain, probabilities = draft.propose(torch.tensor([[1, 2, 3, 9, 1, 2]]))
    assert chain == [3, 9, 1] and len(probabilities) == 3  # "1 2" matched at the start, what followed it
    assert draft.pending and profile.offered[0][0] == 0
    chain, _ = draft.propose(torch.tensor([[1, 2, 3, 9, 1, 2, 3]]))  # 1 token written, it matched: not resolved yet
    assert profile.offered[0][0] == 0
    assert chain == [9, 1, 2] and draft.pending[-1][2] == 1  # proposed in state 1: the last proposal's 1 right token
    draft.propose(torch.tensor([[1, 2, 3, 9, 1, 2, 3, 9, 4]]))  # both resolved: 2 matched, then 1
    assert profile.offered[0][:3] == [1.0, 1.0, 1.0] and profile.matched[0][:3] == [1.0, 1.0, 0.0]
    assert profile.offered[1][:3] == [1.0, 1.0, 1.0] and profile.matched[1][:3] == [1.0, 0.0, 0.0]
    assert matched_prefix([1, 2, 3], [1, 2]) == 2 and matched_prefix([1, 2], [0]) == 0
    assert draft.propose(torch.tensor([[5, 6, 7]])) == ([], [])  # nothing matches


def test_prompt_lookup_setting():
    assert prompt_lookup_tokens(None, "auto") == 10 and prompt_lookup_tokens(None, 8) == 0
    assert prompt_lookup_tokens(4, 8) == 4 and prompt_lookup_tokens(0, "auto") == 0
    for bad in (-1, 2.5, True, "10"):
        with pytest.raises(ValueError, match="prompt_lookup_num_tokens"):
            prompt_lookup_tokens(bad, "auto")


def repetitive_prompt():
    return torch.tensor([[5, 17, 42, 8, 61, 3, 29, 5, 17, 42, 8, 61]])


@pytest.mark.parametrize("budget,lookup", [("auto", None), (4, 6), (1, 6)])
def test_greedy_with_prompt_lookup_equals_plain_generate(budget, lookup):
    target = make_tiny_target("llama", seed=1)
    head = JetSpecHead.from_target(target, num_hidden_layers=1, block_size=6)
    head.generation_config.tree_budget = budget
    head.generation_config.prompt_lookup_num_tokens = lookup
    prompt = repetitive_prompt()
    expected = target.generate(prompt, do_sample=False, max_new_tokens=60)
    out = target.generate(prompt, do_sample=False, max_new_tokens=60, assistant_model=head)
    assert out.tolist() == expected.tolist()
    stats = head.last_generate_stats
    if budget != "auto":  # fixed budgets verify every proposal: the merged rows were exercised
        assert stats.lookup_nodes > 0 and stats.accepted_lookup > 0


def test_prompt_lookup_off_with_a_fixed_budget_by_default():
    target = make_tiny_target("llama", seed=1)
    head = JetSpecHead.from_target(target, num_hidden_layers=1, block_size=6)
    head.generation_config.tree_budget = 4
    target.generate(repetitive_prompt(), do_sample=False, max_new_tokens=30, assistant_model=head)
    assert head.last_generate_stats.lookup_nodes == 0


def test_seeded_sampling_with_prompt_lookup_reproduces_plain_sampling():
    target = make_tiny_target("llama", seed=1, vocab_size=12)
    head = JetSpecHead.from_target(target, num_hidden_layers=1, block_size=4)
    head.generation_config.tree_budget = 4
    head.generation_config.prompt_lookup_num_tokens = 5
    prompt = torch.tensor([[1, 2, 3, 4, 1, 2, 3, 4, 1, 2]])
    used = 0
    for seed in range(5):
        torch.manual_seed(seed)
        expected = target.generate(prompt, do_sample=True, max_new_tokens=40, pad_token_id=0, temperature=0.7)
        torch.manual_seed(seed)
        out = target.generate(prompt, do_sample=True, max_new_tokens=40, pad_token_id=0, temperature=0.7,
                              assistant_model=head)
        assert out.tolist() == expected.tolist()
        used += head.last_generate_stats.accepted_lookup
    assert used > 0
