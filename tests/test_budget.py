"""`tree_budget="auto"` for one prompt: the verify-cost model, the per-round choice, tree prefixes, and losslessness."""

import math

import pytest
import torch
from conftest import make_tiny_target

from hf_jetspec import JetSpecHead, build_tree
from hf_jetspec.acceptance import AcceptanceProfile, acceptance_history, acceptance_profile
from hf_jetspec.cost import VerifyCost
from hf_jetspec.planning import BatchCost, BatchRoundBudget, measure_batch_cost
from hf_jetspec.tree import tree_from_parents


def one_row_budget(verify: VerifyCost, profile: AcceptanceProfile | None = None, fixed: float = 0.5) -> BatchRoundBudget:
    """The per-round budget of a one-row call with the given verify cost (lm_head and draft costs left out)."""
    cost = BatchCost(batch_size=1, verify=verify, lm_head_base=0.0, lm_head_per_row=0.0, draft_base=0.0)
    return BatchRoundBudget(cost, max_nodes=64, initial_fixed=fixed, profile=profile)


def chain_tree(scores: list[float]):
    """A chain of `len(scores)` nodes whose best-first path scores are `scores` (root first)."""
    return tree_from_parents(list(range(len(scores))), [-1] + list(range(len(scores) - 1)), scores=scores)


def test_verify_cost_interpolates_and_extrapolates():
    cost = VerifyCost(sizes=(1, 4, 8), seconds=(1.0, 1.0, 3.0))
    assert cost(1) == cost(0) == cost(3) == 1.0
    assert cost(6) == pytest.approx(2.0)
    assert cost(10) == pytest.approx(4.0)  # last slope: 0.5 s per node


def test_round_budget_follows_cost_and_confidence():
    tree = chain_tree([0.0] + [math.log(0.9)] * 7 + [math.log(0.01)] * 8)  # 7 likely nodes, then unlikely ones
    assert one_row_budget(VerifyCost(sizes=(1, 64), seconds=(1.0, 1.0))).choose([tree]) == 16  # free nodes: take all
    steep = one_row_budget(VerifyCost(sizes=(1, 2, 64), seconds=(1.0, 10.0, 100.0)))
    assert steep.choose([tree]) == 1 and not steep.drafting_pays  # a second node costs 10x: do not draft
    knee = one_row_budget(VerifyCost(sizes=(1, 8, 9, 64), seconds=(1.0, 1.0, 2.0, 50.0)))
    assert knee.choose([tree]) == 8  # the likely nodes fit before the cost jumps


def test_round_budget_calibrates_against_what_was_accepted():
    tree = chain_tree([0.0] + [math.log(0.9)] * 7)
    budget = one_row_budget(VerifyCost(sizes=(1,), seconds=(1.0,)), fixed=1.0)
    assert budget.calibration == 1.0
    for _ in range(40):  # the head promised sum(exp(scores)) tokens per round; the target took none
        budget.observe([tree], [[]], round_seconds=2.0, verify_seconds=1.5, draft_seconds=0.1)
    assert budget.calibration < 0.2
    assert budget.fixed_seconds == pytest.approx(0.5, abs=1e-3) and budget.draft_seconds == pytest.approx(0.1, abs=1e-3)



def test_round_costs_are_measured_every_round_and_kept_for_the_next_call():
    """The rest of a round (accept, cache, host) is measured in every round, the head's draft in drafted ones, and
    both are kept in the (target, head) profile for the next call at this batch size: a cost-model estimate far off
    (here 30 s) lasts one call's first rounds at most, not every call, nor every round the head pauses."""
    tree = chain_tree([0.0] + [math.log(0.9)] * 7)
    root = chain_tree([0.0])
    budget = one_row_budget(VerifyCost(sizes=(1,), seconds=(1.0,)), fixed=30.0)
    for _ in range(60):  # the head paused: proposals (none here) and the roots alone
        budget.observe([root], [[]], round_seconds=1.3, verify_seconds=1.0, draft_seconds=0.0, drafted=False)
    assert budget.rest_seconds == pytest.approx(0.3, abs=1e-3)
    for _ in range(40):
        budget.observe([tree], [[1]], round_seconds=1.5, verify_seconds=1.0, draft_seconds=0.2)
    assert budget.draft_seconds == pytest.approx(0.2, abs=1e-3) and budget.fixed_seconds == pytest.approx(0.5, abs=1e-3)
    later = one_row_budget(VerifyCost(sizes=(1,), seconds=(1.0,)), profile=budget.profile, fixed=30.0)
    assert later.fixed_seconds == pytest.approx(0.5, abs=1e-3)
    assert one_row_budget(VerifyCost(sizes=(1,), seconds=(1.0,)), fixed=30.0).fixed_seconds == 30.0  # a fresh profile

def test_measured_batch_cost_is_cached_and_monotone(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_JETSPEC_MEASUREMENTS", str(tmp_path))
    target = make_tiny_target("llama")
    head = JetSpecHead.from_target(target, num_hidden_layers=1, block_size=4).bind(target)
    cost = measure_batch_cost(target, head, 1, context_length=8, repeats=1, max_total_rows=16)
    assert cost.verify.sizes[0] == 1 and all(a <= b for a, b in zip(cost.verify.seconds, cost.verify.seconds[1:]))
    assert measure_batch_cost(target, head, 1, context_length=8, repeats=1, max_total_rows=16) is cost
    assert len(list(tmp_path.glob("batch_cost-*.json"))) == 1  # kept for the next process


def test_calibration_is_per_node_index():
    # The head is right about its first guess and wrong everywhere else, though it finds every node likely.
    scores = [0.0] + [math.log(0.9)] * 15
    profile = AcceptanceProfile()
    for _ in range(50):
        profile.observe_tree(scores, [1])
    scales = profile.scales(16)
    assert scales[1] > 1.0 and max(scales[2:]) < 0.1
    cost = VerifyCost(sizes=(1, 64), seconds=(1.0, 1.5))  # extra nodes are cheap but not free
    assert one_row_budget(cost, profile).choose([chain_tree(scores)]) == 2
    # One overall scale (what every node gave on average) would still buy nodes that are never accepted.
    uniform = AcceptanceProfile()
    uniform.total_predicted, uniform.total_accepted = profile.total_predicted, profile.total_accepted
    assert one_row_budget(cost, uniform).choose([chain_tree(scores)]) > 2


def test_tree_prefix_is_the_best_smaller_tree():
    logprobs = torch.log_softmax(torch.randn(5, 20, generator=torch.Generator().manual_seed(0)), -1)
    big = build_tree(3, logprobs, budget=30, topk=4)
    assert all(a >= b for a, b in zip(big.scores, big.scores[1:]))  # best-first: non-increasing path log-probs
    for size in (1, 2, 7, 30):
        small, direct = big.prefix(size), build_tree(3, logprobs, budget=size, topk=4)
        assert small.tokens.tolist() == direct.tokens.tolist() and small.parents == direct.parents
        assert torch.equal(small.ancestor_mask, direct.ancestor_mask)
        assert [small.child_tokens(n) for n in range(size)] == [direct.child_tokens(n) for n in range(size)]
    with pytest.raises(ValueError, match="root"):
        big.prefix(0)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_auto_budget_is_lossless_and_is_the_default(family):
    target = make_tiny_target(family)
    head = JetSpecHead.from_target(target, num_hidden_layers=1, block_size=6)
    assert head.generation_config.tree_budget == "auto"
    input_ids = torch.randint(target.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    expected = target.generate(input_ids, max_new_tokens=30, do_sample=False)
    out = target.generate(input_ids, assistant_model=head, max_new_tokens=30, do_sample=False)
    assert torch.equal(out, expected)
    stats = head.last_generate_stats
    assert stats.tree_budget == "auto" and 1 <= stats.mean_tree_size
    profile = acceptance_profile(target, head)  # kept for the next call with this head and target
    assert profile is acceptance_profile(target, head) and profile.total_predicted > 0
    assert 1 in acceptance_history(target, head).spec_token_seconds  # this call's speed, for the next plan
    assert torch.equal(target.generate(input_ids, assistant_model=head, max_new_tokens=30, do_sample=False), expected)
    head.generation_config.tree_budget = "big"
    with pytest.raises(ValueError, match="tree_budget"):
        target.generate(input_ids, assistant_model=head, max_new_tokens=4, do_sample=False)


def test_auto_budget_with_a_useless_head_is_lossless_and_mostly_plain_steps():
    target = make_tiny_target("llama")
    head = JetSpecHead.from_target(target, num_hidden_layers=1, block_size=6)  # random: never right
    input_ids = torch.randint(target.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    expected = target.generate(input_ids, max_new_tokens=60, do_sample=False)
    out = target.generate(input_ids, assistant_model=head, max_new_tokens=60, do_sample=False)
    assert torch.equal(out, expected)
    stats = head.last_generate_stats
    assert stats.draft_rounds < stats.rounds / 2  # backed off: most rounds were plain steps
    assert stats.drafted_tau >= 1.0 and stats.mean_accepted_length >= 1.0
