"""Draft vocabulary and draft projection: only the trees change, never the output; the ids travel with the head."""

import json

import pytest
import torch
from conftest import make_tiny_target
from safetensors.torch import load_file, save_file

from hf_jetspec import JetSpecHead
from hf_jetspec.drafting import BatchedDrafter
from hf_jetspec.draft_vocab import DraftProjection, coverage, projection_dtype, select_draft_vocab, token_counts

PROMPT = torch.tensor([[5, 17, 42, 8, 61, 3, 29]])


def test_counts_select_and_coverage():
    counts = token_counts([[3, 3, 3, 7], [7, 1], []], vocab_size=10)
    assert counts.tolist() == [0, 1, 0, 3, 0, 0, 0, 2, 0, 0]
    assert select_draft_vocab(counts, 2).tolist() == [3, 7]
    assert select_draft_vocab(counts, 4).tolist() == [0, 1, 3, 7]  # ties (count 0) go to the lower id
    assert select_draft_vocab(counts, 3, always=[9]).tolist() == [3, 7, 9]
    assert coverage(counts, torch.tensor([3, 7])) == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="draft vocabulary size"):
        select_draft_vocab(counts, 0)
    with pytest.raises(ValueError, match="token ids must lie"):
        token_counts([[10]], vocab_size=10)


def test_projection_is_the_lm_head_restricted_to_the_draft_vocabulary():
    torch.manual_seed(0)
    weight, hidden = torch.randn(50, 16), torch.randn(3, 16)
    ids = torch.tensor([2, 5, 11, 40])
    projection = DraftProjection(weight, ids, torch.float32)
    expected = (hidden @ weight.T)[:, ids].log_softmax(-1)
    torch.testing.assert_close(projection.logprobs(hidden), expected)
    full = DraftProjection(weight, None, torch.float32)
    torch.testing.assert_close(full.logprobs(hidden), (hidden @ weight.T).log_softmax(-1))
    from hf_jetspec.cpu import BF16_MIN_MATMUL_SPEEDUP, bf16_matmul_speedup

    fast = bf16_matmul_speedup() >= BF16_MIN_MATMUL_SPEEDUP  # native bf16 (AMX, AVX-512 BF16): 3-4x; AVX2: < 1
    assert projection_dtype(torch.device("cpu"), torch.float32) == (torch.bfloat16 if fast else torch.float32)
    assert projection_dtype(torch.device("cpu"), torch.float16) == torch.float16


def test_bf16_fast_paths_follow_the_measured_matmul_speed(monkeypatch):
    import hf_jetspec.cpu

    for speedup, expected in ((3.5, torch.bfloat16), (0.4, torch.float32)):
        monkeypatch.setattr(hf_jetspec.cpu, "bf16_matmul_speedup", lambda *a, s=speedup, **k: s)
        assert projection_dtype(torch.device("cpu"), torch.float32) == expected


def head_with_vocab(target, ids, block_size=6):
    head = JetSpecHead.from_target(target, num_hidden_layers=1, block_size=block_size)
    return head.set_draft_vocab(ids)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("budget", [4, 16])
def test_greedy_with_a_draft_vocabulary_equals_plain_generate(family, budget):
    target = make_tiny_target(family, seed=1)
    expected = target.generate(PROMPT, do_sample=False, max_new_tokens=40)
    # a vocabulary that leaves out half of the tokens the target writes: drafts miss them, output must not change
    written = sorted(set(expected[0, PROMPT.shape[1]:].tolist()))
    ids = [t for t in range(target.config.vocab_size) if t not in written[::2]]
    head = head_with_vocab(target, ids)
    head.generation_config.tree_budget = budget
    out = target.generate(PROMPT, assistant_model=head, do_sample=False, max_new_tokens=40)
    assert out.tolist() == expected.tolist()
    assert head.last_generate_stats.drafted_nodes > 0


def test_trees_only_offer_draft_vocabulary_tokens():
    target = make_tiny_target("llama", seed=2)
    ids = torch.arange(10, 40)
    head = head_with_vocab(target, ids).bind(target)
    drafter = BatchedDrafter(head, 1, tree_topk=4)
    out = target(PROMPT, output_hidden_states=True)
    features = torch.cat([out.hidden_states[i + 1] for i in head.config.target_layer_ids], dim=-1)
    drafter.add_context(features, torch.arange(PROMPT.shape[1])[None], torch.ones(1, PROMPT.shape[1], dtype=torch.bool))
    tree = drafter.draft(PROMPT[:, -1], torch.tensor([PROMPT.shape[1] - 1]), max_nodes=12, depth=head.config.block_size - 1)[0]
    assert tree.num_nodes == 12
    assert set(tree.tokens[1:].tolist()) <= set(ids.tolist())
    assert max(tree.depths.tolist()) <= head.config.block_size - 1


def test_batched_greedy_with_a_draft_vocabulary_equals_plain_generate():
    target = make_tiny_target("qwen3", seed=3)
    input_ids = torch.tensor([[0, 0, 5, 17, 42], [9, 8, 7, 6, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    target.generation_config.pad_token_id = 0
    expected = target.generate(input_ids, attention_mask=mask, do_sample=False, max_new_tokens=24)
    head = head_with_vocab(target, torch.arange(0, 96, 2))
    head.generation_config.tree_budget = 8
    out = target.generate(input_ids, attention_mask=mask, assistant_model=head, do_sample=False, max_new_tokens=24)
    assert out.tolist() == expected.tolist()


def test_draft_vocabulary_round_trips_and_bad_ones_are_refused(tmp_path):
    target = make_tiny_target("llama", seed=4)
    head = head_with_vocab(target, [40, 3, 7, 90])  # any order in, sorted ids stored
    assert head.draft_vocab.tolist() == [3, 7, 40, 90] and head.config.draft_vocab_size == 4
    head.save_pretrained(tmp_path / "head")
    loaded = JetSpecHead.from_pretrained(tmp_path / "head")
    assert loaded.draft_vocab.tolist() == [3, 7, 40, 90]
    assert json.loads((tmp_path / "head" / "config.json").read_text())["draft_vocab_size"] == 4

    weights = load_file(tmp_path / "head" / "model.safetensors")
    del weights["draft_vocab"]
    save_file(weights, tmp_path / "head" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="no valid `draft_vocab`"):
        JetSpecHead.from_pretrained(tmp_path / "head")

    with pytest.raises(ValueError, match="strictly increasing"):
        head.set_draft_vocab([3, 3, 5])
    with pytest.raises(ValueError, match="must lie in"):
        head.set_draft_vocab([5, 96])
    head.set_draft_vocab(None)
    assert head.draft_vocab is None and head.config.draft_vocab_size is None
    head.save_pretrained(tmp_path / "full")
    assert "draft_vocab" not in load_file(tmp_path / "full" / "model.safetensors")


def test_dflash_export_refuses_a_draft_vocabulary_and_says_how():
    from hf_jetspec import dflash_incompatibility

    target = make_tiny_target("qwen3", seed=5)
    head = head_with_vocab(target, torch.arange(50)).bind(target)
    assert "set_draft_vocab(None)" in dflash_incompatibility(head)
