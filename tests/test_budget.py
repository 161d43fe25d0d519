"""`tree_budget="auto"`: the verify-cost model, the per-round choice, tree prefixes, and losslessness."""

import math

import pytest
import torch
from conftest import make_tiny_target

from hf_jetspec import JetSpecHead, build_tree
from hf_jetspec.acceptance import AcceptanceProfile, acceptance_profile
from hf_jetspec.budget import AutoBudget, measure_verify_cost
from hf_jetspec.cost import VerifyCost
from hf_jetspec.verify import verify_tree


def test_verify_cost_interpolates_and_extrapolates():
    cost = VerifyCost(sizes=(1, 4, 8), seconds=(1.0, 1.0, 3.0))
    assert cost(1) == cost(0) == cost(3) == 1.0
    assert cost(6) == pytest.approx(2.0)
    assert cost(10) == pytest.approx(4.0)  # last slope: 0.5 s per node


def test_auto_budget_follows_cost_and_confidence():
    scores = [0.0] + [math.log(0.9)] * 7 + [math.log(0.01)] * 8  # 7 likely nodes, then unlikely ones
    flat = AutoBudget(VerifyCost(sizes=(1, 64), seconds=(1.0, 1.0)))
    assert flat.choose(scores) == 16  # free nodes: take everything the tree offers
    steep = AutoBudget(VerifyCost(sizes=(1, 2, 64), seconds=(1.0, 10.0, 100.0)))
    assert steep.choose(scores) == 1  # a second node costs 10x: do not draft
    knee = AutoBudget(VerifyCost(sizes=(1, 8, 9, 64), seconds=(1.0, 1.0, 2.0, 50.0)))
    assert knee.choose(scores) == 8  # the likely nodes fit before the cost jumps


def test_auto_budget_calibrates_against_what_was_accepted():
    tree = build_tree(0, torch.log_softmax(torch.randn(4, 10), -1), budget=8, topk=3)
    budget = AutoBudget(VerifyCost(sizes=(1,), seconds=(1.0,)))
    assert budget.calibration == 1.0
    for _ in range(20):  # the head promised sum(exp(scores)) tokens per round; the target took none
        budget.observe(tree, [], round_seconds=2.0, verify_seconds=1.5)
    assert budget.calibration < 0.2
    assert budget.fixed_seconds == pytest.approx(0.5)


def test_calibration_is_per_node_index():
    # The head is right about its first guess and wrong everywhere else, though it finds every node likely.
    scores = [0.0] + [math.log(0.9)] * 15
    profile = AcceptanceProfile()
    for _ in range(50):
        profile.observe_tree(scores, [1])
    scales = profile.scales(16)
    assert scales[1] > 1.0 and max(scales[2:]) < 0.1
    cost = VerifyCost(sizes=(1, 64), seconds=(1.0, 1.5))  # extra nodes are cheap but not free
    assert AutoBudget(cost, profile=profile).choose(scores) == 2
    # One overall scale (what every node gave on average) would still buy nodes that are never accepted.
    uniform = AcceptanceProfile()
    uniform.total_predicted, uniform.total_accepted = profile.total_predicted, profile.total_accepted
    assert AutoBudget(cost, profile=uniform).choose(scores) > 2


def test_accept_cost_per_token_and_draft_budget():
    # Accepting costs per emitted token (the target's lm_head row, the logits processors): it does not make a tree
    # that gives more tokens worth more. Lumped into the per-round fixed cost it would, and trees would grow.
    scores = [0.0] + [i * math.log(0.8) for i in range(1, 16)]
    cost = VerifyCost(sizes=(1, 2, 16), seconds=(1.0, 1.3, 4.0))
    tree = build_tree(0, torch.log_softmax(torch.randn(4, 10), -1), budget=8, topk=3)
    cheap, costly = AutoBudget(cost), AutoBudget(cost)
    cheap.observe(tree, [1, 2], round_seconds=1.8, verify_seconds=1.0, draft_seconds=0.2, accept_seconds=0.3)
    costly.observe(tree, [1, 2], round_seconds=10.5, verify_seconds=1.0, draft_seconds=0.2, accept_seconds=9.0)
    assert costly.profile.accept_seconds_per_token == pytest.approx(3.0)
    assert cheap.fixed_seconds == pytest.approx(0.5) and costly.fixed_seconds == pytest.approx(0.5)
    for budget in (cheap, costly):
        budget.profile.total_predicted = budget.profile.total_accepted = 2.0  # calibration 1 for this check
        budget.profile.predicted, budget.profile.accepted = [0.0] * 256, [0.0] * 256
    lumped = AcceptanceProfile()
    lumped.observe_costs(fixed=0.5 + 9.0, accept_per_token=0.0, draft=0.2)
    assert cheap.choose(scores) == costly.choose(scores) == 6 < AutoBudget(cost, profile=lumped).choose(scores)
    budget = AutoBudget(cost, max_budget=40)
    assert budget.draft_budget() == 40  # nothing chosen yet: explore the largest tree
    budget.sizes += [2, 3, 2]
    assert budget.draft_budget() == 8
    budget.sizes.append(13)
    assert budget.draft_budget() == 26


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


def test_measured_cost_is_cached_and_monotone():
    target = make_tiny_target("llama")
    decoder = target.model

    def verify(tree, past, cache):
        verify_tree(decoder, tree, past, cache, [2], target.dtype)

    cost = measure_verify_cost(target, verify, sizes=(1, 4, 16), context_length=8, repeats=1)
    assert cost.sizes == (1, 4, 16) and all(a <= b for a, b in zip(cost.seconds, cost.seconds[1:]))
    assert measure_verify_cost(target, verify, sizes=(1, 4, 16), context_length=8) is cost


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
    assert profile is acceptance_profile(target, head) and profile.fixed_seconds is not None
    assert profile.draft_seconds is not None and profile.accept_seconds_per_token is not None
    assert torch.equal(target.generate(input_ids, assistant_model=head, max_new_tokens=30, do_sample=False), expected)
    head.generation_config.tree_budget = "big"
    with pytest.raises(ValueError, match="tree_budget"):
        target.generate(input_ids, assistant_model=head, max_new_tokens=4, do_sample=False)


def test_auto_budget_backs_off_drafting_that_does_not_pay_and_probes_again():
    scores = [0.0] + [math.log(0.05)] * 15  # a head that is rarely right
    budget = AutoBudget(VerifyCost(sizes=(1, 16), seconds=(1.0, 1.2)), patience=2, initial_backoff=3, max_backoff=6)
    tree = build_tree(0, torch.log_softmax(torch.randn(4, 10), -1), budget=8, topk=3)
    for _ in range(20):  # drafting costs 1 s per round, a plain step 1.1 s: a round must gain > 1.9 tokens
        budget.observe(tree, [], round_seconds=3.2, verify_seconds=1.2, draft_seconds=1.0)
    plan = []
    for _ in range(16):
        drafting = budget.should_draft()
        plan.append(drafting)
        if drafting:
            budget.choose(scores)
            assert not budget.drafting_pays
    # 2 losing rounds -> skip 3, 2 more -> skip 6 (doubled), 2 more -> skip 6 (capped)
    assert plan == [True, True, False, False, False, True, True] + [False] * 6 + [True, True, False]
    assert budget.skipped_rounds == 10
    sure = [0.0] + [math.log(0.99)] * 15  # a confident, calibrated head pays: drafting resumes at once
    profile = budget.profile
    profile.total_accepted, profile.accepted = profile.total_predicted, list(profile.predicted)
    budget._skip = 0
    budget.choose(sure)
    assert budget.drafting_pays and budget.should_draft()


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
