import pytest
import torch
from conftest import make_tiny_target

from hf_jetspec import JetSpecConfig, JetSpecContextCache, JetSpecHead, default_target_layer_ids, draft_attention_mask


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_head_drafts_block_size_minus_one_depths_and_caches_only_context(family):
    target = make_tiny_target(family)
    head = JetSpecHead.from_target(target, num_hidden_layers=2, block_size=5)
    taps = len(head.config.target_layer_ids)
    cache = JetSpecContextCache()
    features = torch.randn(1, 6, taps * 32)
    out = head(torch.tensor([[3]]), torch.tensor([[6]]), features, torch.arange(6)[None], past_key_values=cache)
    assert out.logits.shape == (1, 1, 4, 96)
    assert [cache.get_seq_length(i) for i in range(2)] == [6, 6]  # block rows are never cached
    out2 = head(torch.tensor([[4]]), torch.tensor([[8]]), torch.randn(1, 2, taps * 32), torch.tensor([[6, 7]]),
                past_key_values=cache)
    assert [cache.get_seq_length(i) for i in range(2)] == [8, 8]
    assert out2.logits.shape == (1, 1, 4, 96)


@pytest.mark.parametrize("anchor_context", [True, False])
def test_a_block_cut_to_its_first_rows_drafts_the_same_depths(anchor_context):
    """The block is causal: drafting d depths with `block_rows=d + 1` gives the full block's first d depths."""
    target = make_tiny_target("qwen3", seed=2)
    head = JetSpecHead.from_target(target, num_hidden_layers=2, block_size=6, anchor_context=anchor_context)
    features = torch.randn(1, 7, len(head.config.target_layer_ids) * 32)
    full = head(torch.tensor([[3]]), torch.tensor([[7]]), features, torch.arange(7)[None])
    for rows in (1, 3):
        cut = head(torch.tensor([[3]]), torch.tensor([[7]]), features, torch.arange(7)[None], block_rows=rows)
        assert cut.logits.shape == (1, 1, rows - 1, 96) and cut.last_hidden_state.shape[1] == rows
        torch.testing.assert_close(cut.last_hidden_state, full.last_hidden_state[:, :rows], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="block_rows"):
        head(torch.tensor([[3]]), torch.tensor([[7]]), features, torch.arange(7)[None], block_rows=7)


def test_incremental_context_equals_one_shot_context():
    target = make_tiny_target("llama")
    head = JetSpecHead.from_target(target, num_hidden_layers=1, block_size=4)
    features = torch.randn(1, 9, len(head.config.target_layer_ids) * 32)
    one_shot = head(torch.tensor([[5]]), torch.tensor([[9]]), features, torch.arange(9)[None]).logits
    cache = JetSpecContextCache()
    head(torch.tensor([[1]]), torch.tensor([[6]]), features[:, :6], torch.arange(6)[None], past_key_values=cache)
    incremental = head(torch.tensor([[5]]), torch.tensor([[9]]), features[:, 6:], torch.arange(6, 9)[None],
                       past_key_values=cache).logits
    torch.testing.assert_close(incremental, one_shot, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("anchor_context", [True, False])
def test_training_forward_over_many_anchors_equals_drafting_one_at_a_time(anchor_context):
    """All anchor blocks in one forward (training) give what drafting each anchor after its own context gives
    (generation), including the anchor_context row taken from the previous call's cache."""
    target = make_tiny_target("llama", seed=3)
    head = JetSpecHead.from_target(target, num_hidden_layers=1, block_size=4, anchor_context=anchor_context,
                                   init_from_target=False)
    assert (head.depth_embedding is not None) == anchor_context
    features = torch.randn(1, 12, len(head.config.target_layer_ids) * 32)
    anchors = torch.tensor([[4, 7, 11]])
    tokens = torch.tensor([[5, 6, 9]])
    positions = torch.arange(12)[None]
    mask = draft_attention_mask(positions, anchors, 4, torch.float32)
    together = head(tokens, anchors, features, positions, attention_mask=mask).logits
    cache, start = JetSpecContextCache(), 0
    for index, anchor in enumerate(anchors[0].tolist()):
        alone = head(tokens[:, index : index + 1], torch.tensor([[anchor]]), features[:, start:anchor],
                     positions[:, start:anchor], past_key_values=cache).logits
        torch.testing.assert_close(alone[0, 0], together[0, index], atol=1e-5, rtol=1e-5)
        start = anchor
    # padding blocks (anchor position 0, no row before them) as the training collator makes them
    padded = head(torch.tensor([[5, 0]]), torch.tensor([[4, 0]]), features, positions,
                  attention_mask=draft_attention_mask(positions, torch.tensor([[4, 0]]), 4, torch.float32)).logits
    torch.testing.assert_close(padded[0, 0], together[0, 0], atol=1e-5, rtol=1e-5)
    if anchor_context:  # no context rows up to the anchor at all: a clear error
        with pytest.raises(ValueError, match="context rows"):
            head(torch.tensor([[1]]), torch.tensor([[3]]), None, None, past_key_values=JetSpecContextCache())


def test_draft_mask_is_causal_inside_blocks_and_sees_only_earlier_context():
    mask = draft_attention_mask(torch.arange(3)[None], torch.tensor([[3, 5]]), 4, torch.float32)
    allowed = mask[0, 0] == 0
    # block 0 (anchor 3) sees context 0..2; block 1 (anchor 5) sees context 0..2 too (all < 5)
    assert allowed[:4, :3].all() and allowed[4:, :3].all()
    # inside a block: lower-triangular; across blocks: nothing
    block = allowed[:, 3:]
    assert torch.equal(block[:4, :4], torch.ones(4, 4, dtype=torch.bool).tril())
    assert not block[:4, 4:].any() and not block[4:, :4].any()
    mask2 = draft_attention_mask(torch.arange(6)[None], torch.tensor([[2]]), 3, torch.float32)
    assert ((mask2[0, 0, :, :6] == 0).sum(-1) == 2).all()  # anchor at 2 sees context positions 0, 1 only


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_head_layers_start_as_copies_of_the_target_last_layers(family):
    target = make_tiny_target(family)
    head = JetSpecHead.from_target(target, num_hidden_layers=2)
    assert head.config.draft_model_type == "qwen3" and head.config.target_model_type == family
    for head_layer, target_layer in zip(head.layers, target.model.layers[-2:]):
        target_state = target_layer.state_dict()
        for name, tensor in head_layer.state_dict().items():
            if name in target_state:
                assert torch.equal(tensor, target_state[name]), name
            else:  # Llama layers have no q/k norms: the head's start as Qwen3 initialises them (ones)
                assert family == "llama" and name.endswith(("q_norm.weight", "k_norm.weight")), name
                assert torch.equal(tensor, torch.ones_like(tensor))
    assert not any("embed_tokens" in name or "lm_head" in name for name in head.state_dict())


def test_head_layers_are_qwen3_whatever_the_target_and_target_family_still_builds():
    from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    target = make_tiny_target("llama")
    head = JetSpecHead.from_target(target)
    assert all(type(layer) is Qwen3DecoderLayer for layer in head.layers)
    assert "quantization_config" not in head.config.draft_config and "_name_or_path" not in head.config.draft_config
    legacy = JetSpecHead.from_target(target, layer_family="target")
    assert all(type(layer) is LlamaDecoderLayer for layer in legacy.layers)
    assert legacy.config.draft_model_type == legacy.config.target_model_type == "llama"
    with pytest.raises(ValueError, match="layer_family"):
        JetSpecHead.from_target(target, layer_family="gemma")


def test_default_taps_are_evenly_spaced():
    assert default_target_layer_ids(30, 3) == [1, 14, 27]
    assert default_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]
    assert default_target_layer_ids(4, 3) == [0, 2, 3]
    assert default_target_layer_ids(30, 1) == [14]


def test_head_for_another_target_is_refused_with_both_sides_named():
    head = JetSpecHead.from_target(make_tiny_target("llama"))
    other = make_tiny_target("llama", vocab_size=80)
    with pytest.raises(ValueError, match="vocab_size: head expects 96, target has 80"):
        head.bind(other)
    deeper = make_tiny_target("llama", num_hidden_layers=6)
    with pytest.raises(ValueError, match="num_hidden_layers: head expects 4, target has 6"):
        deeper.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False, assistant_model=head)


def test_unbound_head_says_how_to_bind():
    head = JetSpecHead(JetSpecHead.from_target(make_tiny_target("llama")).config)
    with pytest.raises(RuntimeError, match="bind"):
        head(torch.tensor([[1]]), torch.tensor([[0]]))


def test_config_validates():
    with pytest.raises(ValueError, match="block_size"):
        JetSpecConfig(block_size=1)
    with pytest.raises(ValueError, match="out of range"):
        JetSpecConfig(draft_config={"model_type": "llama"}, target_layer_ids=[7], target_num_hidden_layers=4)
    with pytest.raises(ValueError, match="not supported|Unknown"):
        JetSpecHead(JetSpecConfig(draft_config={"model_type": "bert"}, target_layer_ids=[0], target_num_hidden_layers=2))


def test_bidirectional_block_sees_later_rows_and_runs_whole():
    """`causal_block=False` (DFlash's block): every block row sees every other, so a row's output depends on the rows
    after it, and drafting runs all rows. Checked by breaking it: with the forward's mask kept causal for such heads,
    the assertion on row 1 fails (it equals the causal head's row)."""
    mask = draft_attention_mask(torch.arange(3)[None], torch.tensor([[3, 5]]), 4, torch.float32, causal=False)
    block = (mask[0, 0] == 0)[:, 3:]
    assert block[:4, :4].all() and block[4:, 4:].all() and not block[:4, 4:].any() and not block[4:, :4].any()

    target = make_tiny_target("qwen3", seed=2)
    causal = JetSpecHead.from_target(target, num_hidden_layers=1, block_size=5, anchor_context=False)
    both = JetSpecHead.from_target(target, num_hidden_layers=1, block_size=5, anchor_context=False, causal_block=False)
    both.load_state_dict(causal.state_dict())
    features = torch.randn(1, 6, len(causal.config.target_layer_ids) * 32)
    args = (torch.tensor([[3]]), torch.tensor([[6]]), features, torch.arange(6)[None])
    one_way, two_way = causal(*args).last_hidden_state, both(*args).last_hidden_state
    assert not torch.allclose(one_way[:, 1], two_way[:, 1], atol=1e-4)  # row 1 saw rows 2..4
    torch.testing.assert_close(one_way[:, -1], two_way[:, -1])  # the last row sees the same rows either way
    assert both.rows_for_depth(1) == 5 and causal.rows_for_depth(1) == 2
    with pytest.raises(ValueError, match="bidirectional"):
        both(*args, block_rows=2)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    """The layers only read the context cache, so checkpointing keeps it (`_can_checkpoint_with_cache`); dropping it
    (Transformers' default for cache-writing layers) would change the keys and fail here."""
    target = make_tiny_target("qwen3", seed=5)
    head = JetSpecHead.from_target(target, num_hidden_layers=2, block_size=4).train()
    taps = len(head.config.target_layer_ids) * 32
    torch.manual_seed(0)
    features = torch.randn(2, 9, taps)
    inputs = (torch.tensor([[3, 7], [4, 1]]), torch.tensor([[5, 8], [6, 9]]), features, torch.arange(9).expand(2, -1))

    def loss_and_grads():
        head.zero_grad()
        loss = head(*inputs).logits.float().logsumexp(-1).mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in head.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = loss_and_grads()
    head.activation_checkpointing_enable()  # gradient_checkpointing_enable: deprecated in 5.x
    assert all(layer.gradient_checkpointing for layer in head.layers)
    loss, grads = loss_and_grads()
    assert torch.allclose(loss, plain_loss) and grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, plain_grads[name], atol=1e-6), name
