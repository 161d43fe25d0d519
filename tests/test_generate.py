"""The test that matters most: speculative output equals the target's own output, token for token."""

import pytest
import torch
from conftest import make_tiny_target, oracle_for
from transformers.generation.streamers import BaseStreamer

from hf_jetspec import JetSpecHead

PROMPT = torch.tensor([[5, 17, 42, 8, 61, 3, 29]])


class CollectingStreamer(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.flatten().tolist())

    def end(self):
        self.ended = True

    @property
    def tokens(self):
        return [token for chunk in self.chunks for token in chunk]


def run(target, head, budget, **kwargs):
    head.generation_config.tree_budget = budget
    kwargs.setdefault("do_sample", False)
    return target.generate(PROMPT, assistant_model=head, **kwargs)


@pytest.mark.parametrize("family,causal_block", [("llama", True), ("qwen3", True), ("qwen3", False)])
@pytest.mark.parametrize("budget", [1, 4, 16, 64])
def test_random_head_greedy_equals_plain_generate(family, causal_block, budget):
    target = make_tiny_target(family, seed=1)
    head = JetSpecHead.from_target(target, num_hidden_layers=1, block_size=6, causal_block=causal_block)
    expected = target.generate(PROMPT, do_sample=False, max_new_tokens=40)
    out = run(target, head, budget, max_new_tokens=40)
    assert out.tolist() == expected.tolist()
    stats = head.last_generate_stats
    assert stats.new_tokens == 40 and stats.tree_budget == budget
    assert stats.drafted_nodes <= stats.rounds * (budget - 1)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("rank_of_truth", [0, 2])
@pytest.mark.parametrize("budget", [8, 32])
def test_oracle_head_accepts_many_tokens_and_stays_exact(family, rank_of_truth, budget):
    target = make_tiny_target(family, seed=2)
    expected = target.generate(PROMPT, do_sample=False, max_new_tokens=48)
    head = oracle_for(target, expected, rank_of_truth=rank_of_truth, block_size=8)
    out = run(target, head, budget, max_new_tokens=48)
    assert out.tolist() == expected.tolist()
    stats = head.last_generate_stats
    # a chain of 7 fits in 8 nodes when the truth is on top; with 2 decoys per depth the tree spreads 3-wide, so
    # 8 nodes reach about depth 2 and 32 nodes about depth 3
    minimum = {(0, 8): 4.0, (0, 32): 4.0, (2, 8): 1.5, (2, 32): 2.5}[(rank_of_truth, budget)]
    assert stats.mean_accepted_length > minimum


def test_eos_inside_an_accepted_path_stops_exactly_there():
    target = make_tiny_target("llama", seed=3)
    free_run = target.generate(PROMPT, do_sample=False, max_new_tokens=40)
    continuation = free_run[0, PROMPT.shape[1]:].tolist()
    eos = continuation[12]
    expected = target.generate(PROMPT, do_sample=False, max_new_tokens=40, eos_token_id=[95, eos])
    assert expected.shape[1] < free_run.shape[1]  # plain generate stopped at the EOS
    head = oracle_for(target, free_run, rank_of_truth=0, block_size=8)  # drafts straight through the EOS
    out = run(target, head, 16, max_new_tokens=40, eos_token_id=[95, eos])
    assert out.tolist() == expected.tolist()


@pytest.mark.parametrize("processors", [{"repetition_penalty": 1.3}, {"no_repeat_ngram_size": 2},
                                        {"repetition_penalty": 1.3, "no_repeat_ngram_size": 3}])
def test_logits_processors_see_each_node_own_path(processors):
    target = make_tiny_target("qwen3", seed=4)
    expected = target.generate(PROMPT, do_sample=False, max_new_tokens=40, **processors)
    plain_run = target.generate(PROMPT, do_sample=False, max_new_tokens=40)
    for reference in (expected, plain_run):  # an oracle for the processed output, and one for the unprocessed one
        head = oracle_for(target, reference, rank_of_truth=1, block_size=8)
        out = run(target, head, 24, max_new_tokens=40, **processors)
        assert out.tolist() == expected.tolist()


def test_scores_logits_streamer_and_cache_match_plain_generate():
    target = make_tiny_target("llama", seed=5)
    kwargs = dict(do_sample=False, max_new_tokens=30, return_dict_in_generate=True, output_scores=True,
                  output_logits=True)
    plain_streamer, spec_streamer = CollectingStreamer(), CollectingStreamer()
    expected = target.generate(PROMPT, streamer=plain_streamer, **kwargs)
    head = oracle_for(target, expected.sequences, rank_of_truth=1, block_size=8)
    out = run(target, head, 16, streamer=spec_streamer, **kwargs)

    assert out.sequences.tolist() == expected.sequences.tolist()
    assert len(out.scores) == len(expected.scores) == 30
    for ours, theirs in zip(out.scores, expected.scores):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    for ours, theirs in zip(out.logits, expected.logits):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    assert spec_streamer.tokens == plain_streamer.tokens and spec_streamer.ended
    assert head.last_generate_stats.mean_accepted_length > 2

    # The target cache holds exactly what plain generate leaves: every token but the last, same keys/values.
    ours, theirs = out.past_key_values, expected.past_key_values
    assert ours.get_seq_length() == theirs.get_seq_length() == out.sequences.shape[1] - 1
    for layer_ours, layer_theirs in zip(ours.layers, theirs.layers):
        torch.testing.assert_close(layer_ours.keys, layer_theirs.keys, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer_ours.values, layer_theirs.values, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_second_turn_continues_the_first_turns_cache_exactly(family):
    """`past_key_values` from the first call passed back with the whole conversation: the target reads only the new
    tokens (as plain generate() does), the head gets the cached part's context from a throwaway forward."""
    import copy

    target = make_tiny_target(family, seed=8)
    first = target.generate(PROMPT, do_sample=False, max_new_tokens=10, return_dict_in_generate=True)
    conversation = torch.cat([first.sequences, torch.tensor([[11, 23, 5, 40]])], dim=-1)  # + the user's next turn
    cache = first.past_key_values
    assert 0 < cache.get_seq_length() < conversation.shape[1]
    expected = target.generate(conversation, past_key_values=copy.deepcopy(cache), do_sample=False,
                               max_new_tokens=30, return_dict_in_generate=True)
    head = oracle_for(target, expected.sequences, rank_of_truth=0, block_size=8)
    out = target.generate(conversation, past_key_values=copy.deepcopy(cache), do_sample=False, max_new_tokens=30,
                          return_dict_in_generate=True, assistant_model=head, tree_budget=8)
    assert out.sequences.tolist() == expected.sequences.tolist()
    assert head.last_generate_stats.mean_accepted_length > 2
    ours, theirs = out.past_key_values, expected.past_key_values
    assert ours.get_seq_length() == theirs.get_seq_length() == out.sequences.shape[1] - 1
    for layer_ours, layer_theirs in zip(ours.layers, theirs.layers):
        torch.testing.assert_close(layer_ours.keys, layer_theirs.keys, atol=1e-5, rtol=1e-4)


def test_a_second_turn_gives_the_head_the_whole_conversations_context(monkeypatch):
    """The head's first context after a cached prefill covers every position of the conversation, with the features
    a prefill without the cache gives."""
    import copy

    from hf_jetspec.drafting import BatchedDrafter

    target = make_tiny_target("qwen3", seed=8)
    first = target.generate(PROMPT, do_sample=False, max_new_tokens=6, return_dict_in_generate=True)
    conversation = torch.cat([first.sequences, torch.tensor([[11, 23, 5]])], dim=-1)
    head = JetSpecHead.from_target(target, num_hidden_layers=1, block_size=4)
    seen = []
    original = BatchedDrafter.add_context

    def record(self, features, position_ids, valid):
        assert bool(valid.all())  # one unpadded row
        seen.append((features.clone(), position_ids.clone()))
        return original(self, features, position_ids, valid)

    monkeypatch.setattr(BatchedDrafter, "add_context", record)
    contexts = []
    for cache in (copy.deepcopy(first.past_key_values), None):
        seen.clear()
        target.generate(conversation, past_key_values=cache, do_sample=False, max_new_tokens=1, assistant_model=head,
                        tree_budget=4)
        contexts.append((torch.cat([f for f, _ in seen], dim=1), torch.cat([p for _, p in seen], dim=1)))
    (features, positions), (full_features, full_positions) = contexts
    assert positions.tolist() == full_positions.tolist() == [list(range(conversation.shape[1]))]
    torch.testing.assert_close(features, full_features, atol=1e-5, rtol=1e-4)


def test_stopping_criteria_are_checked_after_every_token():
    from transformers import StoppingCriteria, StoppingCriteriaList

    class StopAfterToken(StoppingCriteria):
        def __init__(self, token):
            self.token = token

        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] == self.token

    target = make_tiny_target("qwen3", seed=6)
    free_run = target.generate(PROMPT, do_sample=False, max_new_tokens=30)
    stop_token = free_run[0, PROMPT.shape[1] + 9].item()
    criteria = StoppingCriteriaList([StopAfterToken(stop_token)])
    expected = target.generate(PROMPT, do_sample=False, max_new_tokens=30, stopping_criteria=criteria)
    head = oracle_for(target, free_run, block_size=8)
    out = run(target, head, 16, max_new_tokens=30, stopping_criteria=criteria)
    assert out.tolist() == expected.tolist()


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_beams=2), "num_beams=1"),
        (dict(cache_implementation="static"), "DynamicCache"),
        (dict(return_dict_in_generate=True, output_attentions=True), "output_attentions"),
    ],
)
def test_unsupported_settings_raise_clear_errors(kwargs, message):
    target = make_tiny_target("llama")
    head = JetSpecHead.from_target(target)
    with pytest.raises(ValueError, match=message):
        target.generate(PROMPT, max_new_tokens=4, assistant_model=head, **kwargs)


def test_tree_incapable_attention_raises_a_clear_error():
    # batches (batch > 1, padding) are tested in test_batched.py
    target = make_tiny_target("llama")
    head = JetSpecHead.from_target(target)
    target.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="cannot take a tree attention mask"):
        target.generate(PROMPT, max_new_tokens=4, do_sample=False, assistant_model=head)


def test_other_assistants_still_use_transformers_own_path():
    target = make_tiny_target("llama", seed=7)
    expected = target.generate(PROMPT, do_sample=False, max_new_tokens=20)
    out = target.generate(PROMPT, do_sample=False, max_new_tokens=20, assistant_model=make_tiny_target("llama", seed=8))
    assert out.tolist() == expected.tolist()
    out = target.generate(PROMPT, do_sample=False, max_new_tokens=20, prompt_lookup_num_tokens=3)
    assert out.tolist() == expected.tolist()


def test_tree_settings_per_call_override_the_head_for_that_call_only():
    """`generate(..., tree_budget=, tree_topk=, prompt_lookup_num_tokens=)` set this call's trees, as Transformers takes
    its own assistant settings per call; the head's `generation_config` is untouched and bad values are refused
    before any forward. Checked by breaking it: without the `_extract_generation_mode_kwargs` hook, generate() refused
    `tree_budget` as an unused model kwarg, and `prompt_lookup_num_tokens=5` was silently ignored (no lookup nodes)."""
    target = make_tiny_target("qwen3", seed=1)
    head = JetSpecHead.from_target(target, num_hidden_layers=1, block_size=6)
    head.generation_config.tree_budget = 16
    expected = target.generate(PROMPT, do_sample=False, max_new_tokens=24)
    repeat = torch.cat([PROMPT, PROMPT, PROMPT], dim=1)  # prompt lookup finds proposals here by default
    out = target.generate(repeat, do_sample=False, max_new_tokens=24, assistant_model=head, prompt_lookup_num_tokens=5)
    assert head.last_generate_stats.lookup_nodes > 0  # a fixed budget drafts no lookup proposals unless asked
    assert out.tolist() == target.generate(repeat, do_sample=False, max_new_tokens=24).tolist()
    target.generate(repeat, do_sample=False, max_new_tokens=24, assistant_model=head)
    assert head.last_generate_stats.lookup_nodes == 0  # the head's own setting again
    out = target.generate(PROMPT, do_sample=False, max_new_tokens=24, assistant_model=head, tree_budget=4, tree_topk=2)
    stats = head.last_generate_stats
    assert out.tolist() == expected.tolist() and (stats.tree_budget, stats.tree_topk) == (4, 2)
    assert stats.drafted_nodes <= stats.rounds * 3
    assert (head.generation_config.tree_budget, head.generation_config.tree_topk) == (16, 7)
    batch = torch.cat([PROMPT, PROMPT.flip(1)])
    out = target.generate(batch, attention_mask=torch.ones_like(batch), do_sample=False, max_new_tokens=12,
                          assistant_model=head, tree_budget=3, tree_topk=1)
    assert head.last_generate_stats.tree_budget == 3
    assert out.tolist() == target.generate(batch, attention_mask=torch.ones_like(batch), do_sample=False,
                                           max_new_tokens=12).tolist()
    head.last_generate_stats = None
    for bad, message in [(dict(tree_budget=0), "tree_budget"), (dict(tree_topk="7"), "tree_topk"),
                         (dict(prompt_lookup_num_tokens=-1), "prompt_lookup_num_tokens"),
                         (dict(tree_budgt=4), "tree_budgt")]:
        with pytest.raises(ValueError, match=message):
            target.generate(PROMPT, max_new_tokens=4, assistant_model=head, **bad)
    assert head.last_generate_stats is None  # refused before any decoding
