"""Sampling with a JetSpec head is lossless: seeded runs equal plain sampling token for token, and the joint
distribution of the first generated tokens matches the target's own, exactly computed, distribution (chi-square and
total variation), while a deliberately broken acceptance rule fails the same test."""

import itertools
import os

import numpy as np
import pytest
import torch
from conftest import distribution_check as compare, make_tiny_target, patch_typical_acceptance

from hf_jetspec import JetSpecHead

VOCAB = 8
NEW_TOKENS = 3
PROMPT = torch.tensor([[1, 2, 3, 4, 1]])
RUNS = int(os.environ.get("JETSPEC_SAMPLING_RUNS", "4000"))  # issue 8 acceptance: JETSPEC_SAMPLING_RUNS=20000
SETTINGS = {
    "t0.5-topk5": dict(temperature=0.5, top_k=5),
    "t1.0-topp0.8": dict(temperature=1.0, top_p=0.8, top_k=0),
    "t1.5-rep1.2": dict(temperature=1.5, repetition_penalty=1.2, top_k=0),
}


@pytest.fixture(scope="module")
def pair():
    target = make_tiny_target("llama", seed=5, vocab_size=VOCAB, num_hidden_layers=2)
    head = JetSpecHead.from_target(target, num_hidden_layers=1, block_size=4)
    head.generation_config.tree_budget = 12
    head.generation_config.tree_topk = 4
    return target, head


def exact_distribution(target, settings: dict) -> np.ndarray:
    """P(first NEW_TOKENS tokens) of plain sampling, from transformers' own processed scores, by enumeration."""
    probs = np.ones([VOCAB] * NEW_TOKENS)
    for step in range(NEW_TOKENS):
        prefixes = list(itertools.product(range(VOCAB), repeat=step))
        inputs = torch.cat([PROMPT.repeat(len(prefixes), 1), torch.tensor(prefixes, dtype=torch.long).view(len(prefixes), step)], 1)
        out = target.generate(inputs, attention_mask=torch.ones_like(inputs), do_sample=True, max_new_tokens=1,
                              output_scores=True, return_dict_in_generate=True, pad_token_id=0, **settings)
        step_probs = torch.softmax(out.scores[0].double(), -1).numpy()  # (len(prefixes), VOCAB)
        shape = [VOCAB] * step + [VOCAB] + [1] * (NEW_TOKENS - step - 1)
        probs = probs * step_probs.reshape(shape)
    return probs.reshape(-1)


def sample_counts(target, head, settings: dict, runs: int, seed: int) -> tuple[np.ndarray, float, int]:
    """(counts of each token sequence, tau, prompt-lookup tokens accepted) over `runs` seeded JetSpec runs."""
    torch.manual_seed(seed)
    counts = np.zeros(VOCAB**NEW_TOKENS)
    accepted = rounds = 0
    accepted_lookup = 0
    for _ in range(runs):
        out = target.generate(PROMPT, do_sample=True, max_new_tokens=NEW_TOKENS, pad_token_id=0, assistant_model=head,
                              **settings)
        tokens = out[0, PROMPT.shape[1] :].tolist()
        counts[np.ravel_multi_index(tokens, [VOCAB] * NEW_TOKENS)] += 1
        accepted += head.last_generate_stats.accepted_drafts
        rounds += head.last_generate_stats.rounds
        accepted_lookup += head.last_generate_stats.accepted_lookup
    return counts, (accepted + rounds) / max(rounds, 1), accepted_lookup


@pytest.mark.parametrize("settings", SETTINGS.values(), ids=SETTINGS.keys())
def test_joint_distribution_of_sampled_tokens_matches_plain_sampling(pair, settings):
    target, head = pair
    probs = exact_distribution(target, settings)
    assert abs(probs.sum() - 1) < 1e-9
    counts, tau, _ = sample_counts(target, head, settings, RUNS, seed=1)
    p_value, tv, tv_noise = compare(counts, probs)
    print(f"{settings}: {RUNS} runs, tau {tau:.3f}, chi-square p {p_value:.4f}, TV {tv:.4f} (noise 99.9% {tv_noise:.4f})")
    assert tau > 1.2  # drafts were accepted: the tree walk, not only the prefill's token, is under test
    assert p_value > 1e-3 and tv <= tv_noise


def test_joint_distribution_with_prompt_lookup_in_the_tree_matches_plain_sampling(pair):
    """Prompt-lookup proposals merged into the tree (see `lookup.py`; the prompt repeats token 1, so they exist)."""
    target, head = pair
    settings = SETTINGS["t1.0-topp0.8"]
    head.generation_config.prompt_lookup_num_tokens = 3
    try:
        counts, tau, accepted_lookup = sample_counts(target, head, settings, RUNS, seed=3)
    finally:
        head.generation_config.prompt_lookup_num_tokens = None
    assert accepted_lookup > 0  # proposals were verified and accepted, not only drafted around
    p_value, tv, tv_noise = compare(counts, exact_distribution(target, settings))
    print(f"with prompt lookup: tau {tau:.3f}, chi-square p {p_value:.4f}, TV {tv:.4f} (noise 99.9% {tv_noise:.4f})")
    assert p_value > 1e-3 and tv <= tv_noise


def test_the_same_test_fails_for_a_broken_acceptance_rule(pair, monkeypatch):
    """'Typical acceptance': take the head's first child whenever the target gives it >= 10% -- a common lossy
    shortcut. The distribution test must catch it."""
    target, head = pair
    patch_typical_acceptance(monkeypatch)
    settings = SETTINGS["t1.0-topp0.8"]
    counts, _, _ = sample_counts(target, head, settings, min(RUNS, 5000), seed=2)
    p_value, tv, tv_noise = compare(counts, exact_distribution(target, settings))
    print(f"broken rule: chi-square p {p_value:.2e}, TV {tv:.4f} (noise 99.9% {tv_noise:.4f})")
    assert p_value < 1e-3 and tv > tv_noise


@pytest.mark.parametrize("settings", [dict(), dict(temperature=0.7, top_k=4, repetition_penalty=1.3)])
def test_seeded_sampling_reproduces_plain_sampling_token_for_token(pair, settings):
    """The head never draws random numbers, and the target samples once per emitted token from the same processed
    distribution as plain sampling: the same seed gives the same tokens."""
    target, head = pair
    for seed in range(5):
        torch.manual_seed(seed)
        expected = target.generate(PROMPT, do_sample=True, max_new_tokens=40, pad_token_id=0, **settings)
        torch.manual_seed(seed)
        out = target.generate(PROMPT, do_sample=True, max_new_tokens=40, pad_token_id=0, assistant_model=head, **settings)
        assert out.tolist() == expected.tolist()
        assert head.last_generate_stats.new_tokens == 40
