"""Exactness on the real default target (SmolLM2-135M-Instruct) with the shipped head and its defaults (`"auto"`
budget + prompt lookup in the tree): what users run. Greedy output equals plain `generate()` token for token for one
prompt (1 and 256 new tokens, an EOS inside an accepted chain), left-padded batches of 3 and 8 prompts of different
lengths, `stop_strings` ending inside a tree and a repetition penalty; seeded sampling equals plain sampling token for
token (one prompt), a prompt 8 positions short of the context limit (8192) running 8 past it. `JETSPEC_LONG_TESTS=1`
adds the batch of 8 and runs the long prompt 24 short and 24 past (a minute and a half on a 2-core CPU).

Checked on purpose: with `choose_token` taking the head's first child whenever the target's best token is within 1.0
logit of it (a lossy "near-greedy" acceptance, which greedy calls with logits processors go through), the stop-string
and repetition-penalty test fails.
"""

import os
from pathlib import Path

import pytest
import torch

import hf_jetspec.verify
from hf_jetspec import JetSpecHead, chat_input_ids

SHIPPED = Path(__file__).resolve().parents[1] / "heads" / "smollm2-135m-instruct-jetspec"
# not from the eval sets nor the training prompts
MATH = "A shop sells pens at 3 dollars each and notebooks at 5 dollars each. Tom buys 4 pens and 2 notebooks. How much does he pay?"
PROMPTS = [
    MATH,
    "Give three tips for writing clear emails.",
    "What is the boiling point of water in Fahrenheit?",
    "Name two planets.",
    "Write a short poem about autumn leaves falling in a quiet park at dusk.",
    "Explain what a prime number is.",
    "Hi!",
    "List the days of the week.",
]
LONG = os.environ.get("JETSPEC_LONG_TESTS") == "1"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shipped(default_target):
    model, tokenizer = default_target
    head = JetSpecHead.from_pretrained(SHIPPED).bind(model, tokenizer)
    assert head.generation_config.tree_budget == "auto"  # the defaults, as shipped
    return model, tokenizer, head


class TreeSpy:
    """Records every verified tree of the one-prompt loop with the committed length before it."""

    def __init__(self, monkeypatch):
        self.rounds = []
        original = hf_jetspec.verify.verify_tree

        def spy(decoder, tree, past_length, *args, **kwargs):
            self.rounds.append((past_length, tree))
            return original(decoder, tree, past_length, *args, **kwargs)

        monkeypatch.setattr(hf_jetspec.verify, "verify_tree", spy)

    def last_round_stopped_inside_its_tree(self, output_length: int) -> bool:
        """Whether the last tree had drafted nodes deeper than what its round emitted (the call stopped inside it)."""
        past_length, tree = self.rounds[-1]
        emitted = output_length - (past_length + 1)
        return int(tree.depths.max()) >= emitted


def test_one_prompt_at_the_defaults_256_and_1_tokens_and_eos_inside_an_accepted_chain(shipped, monkeypatch):
    model, tokenizer, head = shipped
    input_ids = chat_input_ids(tokenizer, MATH)
    expected = model.generate(input_ids, do_sample=False, max_new_tokens=256)
    out = model.generate(input_ids, do_sample=False, max_new_tokens=256, assistant_model=head)
    assert out.tolist() == expected.tolist()
    stats = head.last_generate_stats
    assert stats.draft_rounds > 0  # the head drafted at least its probe rounds
    print(f"256 tokens: {out.shape[1] - input_ids.shape[1]} emitted, tau {stats.mean_accepted_length:.2f}")

    # An EOS token reached inside an accepted chain: a token the head drafted and the target accepted, with more of
    # the round's chain accepted after it, made an EOS (`eos_token_id` lists are Transformers' own). The chain is
    # found at a fixed budget: the "auto" budget follows this machine's timings, so its trees differ run to run.
    spy = TreeSpy(monkeypatch)
    out = model.generate(input_ids, do_sample=False, max_new_tokens=256, assistant_model=head, tree_budget=8)
    assert out.tolist() == expected.tolist()
    generated = out[0, input_ids.shape[1] :].tolist()
    eos = None
    for past_length, tree in spy.rounds[1:]:
        accepted = out[0, past_length + 1 :].tolist()
        node, chain = 0, []
        while (child := tree.child_with_token(node, accepted[len(chain)] if len(chain) < len(accepted) else -1)) is not None:
            chain.append(int(tree.tokens[child]))
            node = child
        if len(chain) >= 3 and generated.index(chain[0]) == past_length + 1 - input_ids.shape[1]:
            eos = chain[0]  # first emitted here, and two more drafted tokens were accepted after it
            break
    assert eos is not None
    kwargs = dict(do_sample=False, max_new_tokens=256, eos_token_id=[tokenizer.eos_token_id, eos])
    expected = model.generate(input_ids, **kwargs)
    assert expected[0, -1] == eos
    assert model.generate(input_ids, assistant_model=head, **kwargs).tolist() == expected.tolist()
    assert model.generate(input_ids, assistant_model=head, tree_budget=8, **kwargs).tolist() == expected.tolist()

    expected = model.generate(input_ids, do_sample=False, max_new_tokens=1)
    out = model.generate(input_ids, do_sample=False, max_new_tokens=1, assistant_model=head)
    assert out.tolist() == expected.tolist() and out.shape[1] == input_ids.shape[1] + 1


def left_padded(tokenizer, prompts):
    tokenizer.padding_side = "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in prompts]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@pytest.mark.parametrize("batch", [3, pytest.param(8, marks=pytest.mark.skipif(not LONG, reason="long form: JETSPEC_LONG_TESTS=1"))])
def test_left_padded_batches_at_the_defaults(shipped, batch):
    model, tokenizer, head = shipped
    inputs = left_padded(tokenizer, PROMPTS[:batch])
    assert len(set(inputs.attention_mask.sum(1).tolist())) > 1  # different lengths: rows are padded
    kwargs = dict(do_sample=False, max_new_tokens=16, pad_token_id=tokenizer.pad_token_id)
    expected = model.generate(**inputs, **kwargs)
    out = model.generate(**inputs, assistant_model=head, **kwargs)
    assert out.tolist() == expected.tolist()
    stats = head.last_generate_stats
    print(f"batch {batch}: speculated {stats.speculated}, tau {stats.mean_accepted_length:.2f}")
    if not stats.speculated:  # the defaults measured plain decoding faster at this size: force the tree loop too
        head.generation_config.tree_budget = 4
        try:
            out = model.generate(**inputs, assistant_model=head, **kwargs)
        finally:
            head.generation_config.tree_budget = "auto"
        assert out.tolist() == expected.tolist() and head.last_generate_stats.speculated


def stop_points_inside_trees(rounds, output_length):
    """Output lengths at which a stop would end a round inside its tree: `k` tokens into a round whose tree drafted
    nodes deeper than `k`, with more of that round's tokens emitted after them."""
    ends = [past for past, _ in rounds[1:]] + [output_length - 1]
    return [past + 1 + k for (past, tree), end in zip(rounds, ends) for k in range(1, end - past)
            if int(tree.depths.max()) > k]


def test_stop_strings_ending_inside_a_tree_and_a_repetition_penalty(shipped, monkeypatch):
    """At the defaults, then at a fixed budget (the "auto" budget follows timings, so its trees differ run to run)
    with a stop string chosen from that run's own trees so the call must stop inside one."""
    model, tokenizer, head = shipped
    input_ids = chat_input_ids(tokenizer, MATH)
    kwargs = dict(do_sample=False, max_new_tokens=56, tokenizer=tokenizer, stop_strings=["= 12"])
    expected = model.generate(input_ids, **kwargs)
    assert tokenizer.decode(expected[0, input_ids.shape[1] :]).endswith("= 12")
    assert model.generate(input_ids, assistant_model=head, **kwargs).tolist() == expected.tolist()

    fixed = dict(do_sample=False, max_new_tokens=56, assistant_model=head, tree_budget=8)
    spy = TreeSpy(monkeypatch)
    full = model.generate(input_ids, **fixed)
    found = None
    for length in stop_points_inside_trees(spy.rounds, full.shape[1]):
        text = tokenizer.decode(full[0, input_ids.shape[1] : length])
        stop = text[-8:]
        if stop.strip() and text.find(stop) == len(text) - len(stop):  # its first occurrence ends there
            kwargs = dict(do_sample=False, max_new_tokens=56, tokenizer=tokenizer, stop_strings=[stop])
            expected = model.generate(input_ids, **kwargs)
            if expected.shape[1] == length:  # the target's own output stops exactly there
                found = stop
                break
    assert found is not None, "no round of this run accepted two drafted tokens in a row"
    spy.rounds.clear()
    out = model.generate(input_ids, **kwargs, **{k: v for k, v in fixed.items() if k not in kwargs})
    assert out.tolist() == expected.tolist()
    assert spy.last_round_stopped_inside_its_tree(out.shape[1])

    kwargs = dict(do_sample=False, max_new_tokens=24, repetition_penalty=1.3)
    expected = model.generate(input_ids, **kwargs)
    assert model.generate(input_ids, assistant_model=head, **kwargs).tolist() == expected.tolist()


def test_a_second_turn_passing_back_the_first_turns_cache(shipped):
    import copy

    model, tokenizer, head = shipped
    messages = [{"role": "user", "content": MATH}]
    first_ids = chat_input_ids(tokenizer, MATH)
    first = model.generate(first_ids, do_sample=False, max_new_tokens=48, return_dict_in_generate=True,
                           assistant_model=head)
    answer = tokenizer.decode(first.sequences[0, first_ids.shape[1]:], skip_special_tokens=True)
    messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "Now explain it to a child."}]
    conversation = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)["input_ids"]
    cache = first.past_key_values
    prefix = first.sequences.shape[1] - 1  # what the cache holds
    if conversation[0, :prefix].tolist() != first.sequences[0, :prefix].tolist():  # the template re-tokenised it
        cache.crop(int((conversation[0, :prefix] == first.sequences[0, :prefix]).long().cumprod(0).sum()))
    expected = model.generate(conversation, past_key_values=copy.deepcopy(cache), do_sample=False, max_new_tokens=64)
    out = model.generate(conversation, past_key_values=copy.deepcopy(cache), do_sample=False, max_new_tokens=64,
                         assistant_model=head, tree_budget=8, prompt_lookup_num_tokens=0)
    assert out.tolist() == expected.tolist()
    assert head.last_generate_stats.accepted_drafts > 0


def test_seeded_sampling_equals_plain_sampling_token_for_token(shipped):
    """One prompt: the head draws no random numbers and the target samples once per emitted token, so the same seed
    gives the same tokens. (Batches sample row by row, not as one `(batch, vocab)` draw: their distribution is
    tested in `test_batched.py`, not their seeded tokens.)"""
    model, tokenizer, head = shipped
    input_ids = chat_input_ids(tokenizer, PROMPTS[1])
    kwargs = dict(do_sample=True, temperature=0.7, top_p=0.9, max_new_tokens=24)
    for seed in (0,):
        torch.manual_seed(seed)
        expected = model.generate(input_ids, **kwargs)
        torch.manual_seed(seed)
        assert model.generate(input_ids, assistant_model=head, **kwargs).tolist() == expected.tolist()


def test_a_prompt_near_the_context_limit(shipped):
    """8 positions short of the limit with 16 new tokens (the long form: 24 short, 48 new), running past the limit as
    plain generate() does."""
    model, tokenizer, head = shipped
    limit = model.config.max_position_embeddings
    short, new_tokens = (24, 48) if LONG else (8, 16)
    text = " ".join(PROMPTS) + " "
    ids = tokenizer(text * (limit // len(tokenizer(text).input_ids) + 1), return_tensors="pt").input_ids[:, : limit - short]
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens)
    expected = model.generate(ids, **kwargs)
    assert model.generate(ids, assistant_model=head, **kwargs).tolist() == expected.tolist()
