"""`verification_attention`: verify forwards of `sdpa` models fold grouped query heads instead of repeating the cache."""

from __future__ import annotations

import pytest
import torch
import transformers.integrations.sdpa_attention as transformers_sdpa
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hf_jetspec.attention import GQA_ATTENTION, gqa_sdpa_attention_forward, verification_attention

from conftest import make_tiny_target, oracle_for


class _Layer(torch.nn.Module):
    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


def _inputs(batch=2, kv_heads=2, groups=3, q_length=5, kv_length=17, head_dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, kv_heads * groups, q_length, head_dim, generator=generator)
    key = torch.randn(batch, kv_heads, kv_length, head_dim, generator=generator)
    value = torch.randn(batch, kv_heads, kv_length, head_dim, generator=generator)
    allowed = torch.rand(batch, 1, q_length, kv_length, generator=generator) > 0.4
    allowed[..., 0] = True  # every query row sees at least one key
    return query, key, value, allowed


@pytest.mark.parametrize("mask_kind", ["bool", "additive", "batch-broadcast"])
@pytest.mark.parametrize("q_length", [2, 5, 16])
def test_folded_heads_equal_transformers_sdpa(mask_kind, q_length, monkeypatch):
    query, key, value, allowed = _inputs(q_length=q_length)
    if mask_kind == "batch-broadcast":
        allowed = allowed[:1]
    mask = allowed if mask_kind != "additive" else torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))
    layer = _Layer(groups=3)
    expected, _ = sdpa_attention_forward(layer, query, key, value, mask, scaling=0.3)

    def no_repeat(*args, **kwargs):
        raise AssertionError("the folded path must not repeat keys and values")

    monkeypatch.setattr(transformers_sdpa, "repeat_kv", no_repeat)
    out, weights = gqa_sdpa_attention_forward(layer, query, key, value, mask, scaling=0.3)
    assert weights is None
    assert out.shape == expected.shape == (2, q_length, 6, 8)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "case", ["one-query-row", "no-mask", "per-head-mask", "no-groups"],
)
def test_other_calls_go_to_transformers_sdpa_unchanged(case, monkeypatch):
    query, key, value, allowed = _inputs(q_length=1 if case == "one-query-row" else 4)
    groups = 1 if case == "no-groups" else 3
    if case == "no-groups":
        key, value = key.repeat_interleave(3, dim=1), value.repeat_interleave(3, dim=1)
    mask = {"no-mask": None, "per-head-mask": allowed.expand(-1, 6, -1, -1)}.get(case, allowed)
    seen = []
    original = transformers_sdpa.sdpa_attention_forward

    def spy(*args, **kwargs):
        seen.append(case)
        return original(*args, **kwargs)

    monkeypatch.setattr("hf_jetspec.attention.sdpa_attention_forward", spy)
    out, _ = gqa_sdpa_attention_forward(_Layer(groups), query, key, value, mask)
    expected, _ = original(_Layer(groups), query, key, value, mask)
    assert seen == [case]
    assert torch.equal(out, expected)


def test_verification_attention_folds_on_this_thread_only_and_always_restores(monkeypatch):
    """Nothing shared is switched: the config keeps "sdpa", another thread's forward during a verify block runs
    Transformers' own sdpa, and the block ends (also on an error) with plain sdpa again."""
    import threading

    import hf_jetspec.attention as attention

    folded = []
    real = attention.gqa_sdpa_attention_forward
    monkeypatch.setattr(attention, "gqa_sdpa_attention_forward",
                        lambda *args, **kwargs: folded.append(threading.get_ident()) or real(*args, **kwargs))
    target = make_tiny_target("llama")
    decoder = target.model
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        with verification_attention(decoder):
            assert decoder.config._attn_implementation == "sdpa"
            decoder(ids)
            other = threading.Thread(target=lambda: decoder(ids))
            other.start()
            other.join()
        assert set(folded) == {threading.get_ident()}  # the other thread's forward was not folded
        folded.clear()
        decoder(ids)
        assert not folded
        with pytest.raises(RuntimeError):
            with verification_attention(decoder):
                raise RuntimeError("a failing forward")
        decoder(ids)
        assert not folded
        target.set_attn_implementation("eager")
        with verification_attention(decoder):
            decoder(ids)
        assert not folded and decoder.config._attn_implementation == "eager"


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_generate_verifies_with_folded_heads_and_equals_plain_generate(family, monkeypatch):
    target = make_tiny_target(family, seed=3)
    prompt = torch.tensor([[5, 17, 42, 9, 33, 8]])
    expected = target.generate(prompt, do_sample=False, max_new_tokens=30)
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[1].shape[2])
        return gqa_sdpa_attention_forward(*args, **kwargs)

    import hf_jetspec.attention as attention

    monkeypatch.setattr(attention, "gqa_sdpa_attention_forward", counting)
    head = oracle_for(target, expected, rank_of_truth=1)
    head.generation_config.tree_budget = 12
    out = target.generate(prompt, do_sample=False, max_new_tokens=30, assistant_model=head)
    assert out.tolist() == expected.tolist()
    assert calls and max(calls) > 1  # tree forwards (several query rows) went through it
    assert target.config._attn_implementation == "sdpa"
