"""Prompt-lookup proposals in batched decoding, and the padded lm_head calls of its accept step: output stays plain
`generate()`'s, row by row; the per-width choice of head nodes and proposal tokens; the padded row counts."""

import math

import pytest
import torch
from conftest import make_tiny_target
from test_batched import PAD, synthetic_cost

import hf_jetspec.decoding
import hf_jetspec.planning
from hf_jetspec import JetSpecHead
from hf_jetspec.acceptance import AcceptanceHistory
from hf_jetspec.planning import BatchRoundBudget, row_choices
from hf_jetspec.accept import projection_rows
from hf_jetspec.projection import ProjectionCost, flat_projection_cost, measure_projection
from hf_jetspec.tree import build_tree, tree_from_parents

MOTIF = [5, 17, 42, 8, 61, 3, 29]


def repetitive_batch(lengths=(12, 7, 10)):
    """Left-padded rows that repeat a motif (so prompt lookup finds matches), of mixed lengths."""
    width = max(lengths)
    input_ids = torch.full((len(lengths), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, length in enumerate(lengths):
        tokens = [MOTIF[(i + row) % len(MOTIF)] for i in range(length)]
        input_ids[row, width - length :] = torch.tensor(tokens)
        mask[row, width - length :] = 1
    return input_ids, mask


@pytest.mark.parametrize("budget,lookup", [(4, 6), ("auto", None), (1, 6)])
def test_batched_greedy_with_prompt_lookup_equals_plain_generate(budget, lookup, monkeypatch):
    target = make_tiny_target("llama", seed=1)
    head = JetSpecHead.from_target(target, num_hidden_layers=1, block_size=6)
    head.generation_config.prompt_lookup_num_tokens = lookup
    if budget == "auto":  # speculate whatever this machine measures (the plan is tested in test_batched.py)
        monkeypatch.setattr(hf_jetspec.planning, "measure_batch_cost", lambda model, head, batch: synthetic_cost(batch))
        monkeypatch.setattr(hf_jetspec.decoding, "acceptance_history", lambda model, head: AcceptanceHistory())
    input_ids, mask = repetitive_batch()
    free_run = target.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=40, pad_token_id=PAD)
    eos = int(free_run[1, input_ids.shape[1] + 6])  # row 1 finishes early
    kwargs = dict(attention_mask=mask, max_new_tokens=40, eos_token_id=eos, do_sample=False, pad_token_id=PAD)
    expected = target.generate(input_ids, **kwargs)
    head.generation_config.tree_budget = budget
    out = target.generate(input_ids, assistant_model=head, **kwargs)
    assert out.tolist() == expected.tolist()
    stats = head.last_generate_stats
    if budget in (1, 4):  # a fixed budget verifies every proposal whole (budget 1: proposals alone, as one prompt)
        assert stats.speculated and stats.lookup_nodes > 0 and stats.accepted_lookup > 0
    if budget == 1:
        assert stats.drafted_nodes == stats.lookup_nodes and stats.draft_rounds == 0


def test_proposals_keep_going_after_the_heads_drafts_stop_paying(monkeypatch):
    target = make_tiny_target("llama", seed=1)
    head = JetSpecHead.from_target(target, num_hidden_layers=1, block_size=6)
    head.generation_config.tree_budget = "auto"
    monkeypatch.setattr(hf_jetspec.planning, "measure_batch_cost",
                        lambda model, head, batch: synthetic_cost(batch, draft_base=50.0))  # drafting never pays
    monkeypatch.setattr(hf_jetspec.decoding, "acceptance_history", lambda model, head: AcceptanceHistory())
    input_ids, mask = repetitive_batch()
    kwargs = dict(attention_mask=mask, max_new_tokens=60, do_sample=False, pad_token_id=PAD)
    expected = target.generate(input_ids, **kwargs)
    out = target.generate(input_ids, assistant_model=head, **kwargs)
    assert out.tolist() == expected.tolist()
    stats = head.last_generate_stats
    stopped = stats.drafting_stopped_at
    assert stopped is not None and max(stats.tree_sizes[stopped + 1 :]) > 1  # proposals verified without the head
    assert stats.accepted_lookup > 0


def test_row_choices_per_width():
    head = [1.0, 0.9, 0.5, 0.4]  # node 1 child of the root, 2 of 1, 3 of the root (see `path` below)
    # no proposal: the head's best-first prefixes
    choices = row_choices(head, [], [], max_width=6)
    assert [choices[w][1:] for w in (1, 2, 4, 6)] == [(1, 0), (2, 0), (4, 0), (4, 0)]
    assert choices[3][0] == pytest.approx(1.0 + 0.9 + 0.5)
    # a proposal that runs through head nodes 1 and 2, then on: sure tokens go first, shared ones count extra only
    # above what the head already gives them
    chain_odds = [0.95, 0.9, 0.85, 0.8]
    choices = row_choices(head, [1, 2], chain_odds, max_width=6)
    expected, size, length = choices[4]
    # best 4-node tree: the head's first 3 nodes + 2 new chain nodes (depths 3, 4), or equivalent alternatives
    assert expected == pytest.approx(max(
        1.0 + 0.9 + 0.5 + (0.95 - 0.9) + (0.9 - 0.5) + 0.85,  # head 3 nodes + chain 3 (two shared) -> 4 nodes
        1.0 + 0.9 + 0.5 + 0.4,  # head alone
        1.0 + 0.9 + 0.5 + 0.05 + 0.4 + 0.85,
    ))
    assert size + length - min(length, 2 if size > 2 else (1 if size > 1 else 0)) <= 4
    for width in range(2, 7):  # a wider round never expects less
        assert choices[width][0] >= choices[width - 1][0]
    # the proposal alone, without the head
    alone = row_choices([1.0], [], chain_odds, max_width=3)
    assert alone[3] == (pytest.approx(1.0 + 0.95 + 0.9), 1, 2)


def test_round_budget_merges_proposals_and_knows_when_drafting_pays():
    logprobs = torch.log_softmax(torch.tensor([[4.0, 1.0, 0.0, -1.0]] * 3), dim=-1)
    tree = build_tree(0, logprobs, 16, 2)
    cost = synthetic_cost(2)
    budget = BatchRoundBudget(cost, max_nodes=16, initial_fixed=0.5, initial_draft=0.1)
    sure = [3, 3, 3, 3]  # a proposal off the head's tree, measured to be right
    trees = budget.choose_trees([tree, tree], [sure, []], [[0.99, 0.98, 0.97, 0.96], []])
    assert trees[0].lookup_nodes and [int(trees[0].tokens[n]) for n in trees[0].lookup_nodes] == sure
    assert not trees[1].lookup_nodes
    assert budget.drafting_pays  # the head's likely nodes are worth more than the proposals alone
    # a weak head next to a sure proposal: drafting does not pay (the proposals alone do better)
    flat = build_tree(0, torch.log_softmax(torch.zeros(3, 4), dim=-1), 16, 4)
    costly = BatchRoundBudget(cost, max_nodes=16, initial_fixed=5.0, initial_draft=4.5)
    costly.choose_trees([flat, flat], [sure, sure], [[0.99, 0.98, 0.97, 0.96]] * 2)
    assert not costly.drafting_pays
    # rows without a proposal still make their own token in rounds without a draft: a flat head beside one sure
    # proposal gives 3.52 tokens/s with drafts against 3.93 without (3.27 if the row without a proposal were dropped)
    flat_topk2 = build_tree(0, torch.log_softmax(torch.zeros(4, 4), dim=-1), 16, 2)
    beside = BatchRoundBudget(cost, max_nodes=16, initial_fixed=1.0, initial_draft=0.5)
    beside.choose_trees([flat_topk2, flat_topk2], [sure, []], [[0.99, 0.98, 0.97, 0.96], []])
    assert not beside.drafting_pays
    # without the head's draft, only the proposals' lengths are chosen
    roots = [build_tree(0, torch.zeros(0, 1), 1, 1)] * 2
    merged = costly.choose_trees(roots, [sure, [1]], [[0.99, 0.98, 0.97, 0.96], [0.01]], drafted=False)
    assert merged[0].num_nodes == 5 and merged[1].num_nodes <= 2


def test_padded_rows_take_the_cheapest_measured_count():
    cost = ProjectionCost(sizes=(1, 2, 3, 4, 8, 12, 16, 32), seconds=(4.0, 4.5, 5.0, 8.0, 12.0, 17.0, 9.5, 12.0))
    assert [cost.padded_rows(m) for m in (1, 3, 4, 5, 9, 13, 16, 20, 40)] == [1, 3, 4, 16, 16, 16, 16, 32, 40]
    assert cost(10) == 9.5 and cost(0) == 0.0 and cost(40) > 12.0
    assert flat_projection_cost().padded_rows(7) == 7
    with pytest.raises(ValueError, match="increasing"):
        ProjectionCost(sizes=(4, 2), seconds=(1.0, 1.0))


def test_measured_projection_is_cached_per_model():
    target = make_tiny_target("llama", seed=1)
    first = measure_projection(target, sizes=(1, 2, 4), repeats=1)
    assert first.sizes == (1, 2, 4) and all(s > 0 for s in first.seconds)
    assert measure_projection(target, sizes=(1, 2, 4), repeats=1) is first


def test_projection_rows_fill_the_padding_with_the_likeliest_nodes():
    scores = [0.0, -0.1, -0.2, -3.0, -0.5]
    first = tree_from_parents([9, 1, 2, 3, 4], [-1, 0, 1, 0, 2], scores=scores)  # main chain 0-1-2-4
    second = tree_from_parents([9, 5, 6], [-1, 0, 0], scores=[0.0, -1.0, -0.05])
    cost = ProjectionCost(sizes=(1, 4, 8), seconds=(1.0, 3.0, 2.0))
    wanted = projection_rows([first, second], [0, 1], [0, 0], [{}, {}], cost)
    assert wanted[:6] == [(0, 0), (0, 1), (0, 2), (0, 4), (1, 0), (1, 1)]  # the main chains first
    assert sorted(wanted[6:]) == [(0, 3), (1, 2)] and len(wanted) == 8
    # computed logits are skipped; a row past its chain asks only for what it lacks
    done = [{0: None, 1: None, 2: None, 4: None}, {}]
    assert projection_rows([first, second], [1], [0, 0], done, flat_projection_cost()) == [(1, 0), (1, 1)]
    # filling as much as ExactArgmax takes: only nodes the row can still reach (below its current node)
    at_node_1 = projection_rows([first, second], [0], [1, 0], [{0: None, 1: None}, {}], None)
    assert at_node_1 == [(0, 2), (0, 4)]  # node 3 hangs off the root, behind the path taken
    assert len(projection_rows([first, second], [0, 1], [0, 0], [{}, {}], None)) == 8  # every node, both rows
