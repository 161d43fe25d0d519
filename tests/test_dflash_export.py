"""Export of JetSpec heads to Transformers' DFlash drafter (`muse_glimmer_assistant`, `speculation_type="dflash"`)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_target
from transformers import AutoModel, MuseGlimmerAssistantModel
from transformers.cache_utils import DFlashCache
from transformers.generation.candidate_generator import DFlashTokenCandidateGenerator

from hf_jetspec import DFLASH_ATTENTION, JetSpecContextCache, JetSpecHead, dflash_incompatibility, export_dflash
from hf_jetspec.verify import tap_features

BLOCK = 5
MASK_TOKEN = 7


def exportable_head(target, num_hidden_layers=2):
    """A Qwen3 head without anchor_context whose mask embedding is the target's embedding of MASK_TOKEN (as a head
    trained with a token-tied, frozen mask embedding has)."""
    torch.manual_seed(1)
    head = JetSpecHead.from_target(target, num_hidden_layers=num_hidden_layers, block_size=BLOCK, anchor_context=False)
    with torch.no_grad():
        head.mask_embedding.copy_(target.get_input_embeddings().weight[MASK_TOKEN])
        for layer in head.layers:  # differ from the target's own last layers, so the head is not a copy of them
            for param in layer.parameters():
                param.add_(0.02 * torch.randn_like(param))
    return head


@pytest.fixture(scope="module")
def qwen3_target():
    return make_tiny_target("qwen3", seed=3, num_hidden_layers=4)


@pytest.fixture(scope="module")
def exported(qwen3_target, tmp_path_factory):
    head = exportable_head(qwen3_target)
    path = export_dflash(head, tmp_path_factory.mktemp("dflash") / "head-dflash")
    return head, path


def block_logits(draft, target, noise_ids, context, positions, cache):
    noise_embeds = target.get_input_embeddings()(noise_ids)
    hidden = draft(noise_embeds=noise_embeds, context_hidden_states=context, position_ids=positions,
                   past_key_values=cache).last_hidden_state
    return target.get_output_embeddings()(hidden[:, 1:])


def test_exportable_head_is_accepted(exported):
    head, path = exported
    assert dflash_incompatibility(head) is None
    assert {p.name for p in path.iterdir()} >= {"config.json", "model.safetensors"}


@torch.no_grad()
def test_block_logits_equal_the_heads(exported, qwen3_target):
    """Same context, two rounds through both caches (7 then 4 new context rows): identical depth logits. With the
    stock bidirectional block attention (attn_implementation="sdpa") they differ: the reason the export names
    "jetspec_block_causal"."""
    head, path = exported
    torch.manual_seed(0)
    ids = torch.randint(0, qwen3_target.config.vocab_size, (1, 12))
    features = tap_features(qwen3_target(ids, output_hidden_states=True).hidden_states, head.config.target_layer_ids)
    for attn, expect_equal in ((None, True), ("sdpa", False)):
        kwargs = {} if attn is None else {"attn_implementation": attn}
        draft = MuseGlimmerAssistantModel.from_pretrained(path, **kwargs).eval()
        assert draft.config._attn_implementation == (attn or DFLASH_ATTENTION)
        ours_cache, their_cache = JetSpecContextCache(), DFlashCache(config=draft.config)
        for round_, (low, high) in enumerate([(0, 7), (7, 11)]):
            positions = torch.arange(low, high)[None]
            ours = head(ids[:, high:high + 1], torch.tensor([[high]]), features[:, low:high], positions,
                        past_key_values=ours_cache).logits[:, 0]
            their_cache.set_previous_accepted_tokens(high - low)
            if round_:
                their_cache.crop(-BLOCK)
            noise = torch.cat([ids[:, high:high + 1], torch.full((1, BLOCK - 1), MASK_TOKEN)], -1)
            theirs = block_logits(draft, qwen3_target, noise, features[:, low:high],
                                  torch.cat([positions, torch.arange(BLOCK)[None] + high], -1), their_cache)
            if expect_equal:
                torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
            else:
                assert (theirs - ours).abs().max() > 1e-3


def test_transformers_dflash_generate_equals_greedy(exported, qwen3_target, monkeypatch):
    """`generate(assistant_model=draft, speculation_type="dflash")` runs Transformers' DFlash candidate generator,
    each round's candidate logits are the head's for the committed sequence, and the output equals plain greedy."""
    head, path = exported
    draft = AutoModel.from_pretrained(path).eval()
    rounds = []
    original = DFlashTokenCandidateGenerator.get_candidates

    def recording(self, input_ids, *args, **kwargs):
        candidate_ids, candidate_logits = original(self, input_ids, *args, **kwargs)
        if candidate_logits is not None:
            rounds.append((input_ids.clone(), candidate_logits.clone()))
        return candidate_ids, candidate_logits

    monkeypatch.setattr(DFlashTokenCandidateGenerator, "get_candidates", recording)
    for seed in range(4):  # a prompt on which some drafts are accepted, so the cache crop after acceptance is covered
        rounds.clear()
        torch.manual_seed(seed)
        input_ids = torch.randint(0, qwen3_target.config.vocab_size, (1, 9))
        greedy = qwen3_target.generate(input_ids, do_sample=False, max_new_tokens=20)
        out = qwen3_target.generate(input_ids, assistant_model=draft, speculation_type="dflash", do_sample=False,
                                    max_new_tokens=20)
        assert torch.equal(out, greedy)
        lengths = [committed.shape[1] for committed, _ in rounds]
        if any(b - a > 1 for a, b in zip(lengths, lengths[1:])):
            break
    else:
        pytest.fail("no drafted token was ever accepted")
    with torch.no_grad():
        for committed, candidate_logits in rounds:
            length = committed.shape[1] - 1  # the last committed token is the anchor
            hidden = qwen3_target(committed[:, :length], output_hidden_states=True).hidden_states
            ours = head(committed[:, -1:], torch.tensor([[length]]), tap_features(hidden, head.config.target_layer_ids),
                        torch.arange(length)[None]).logits[:, 0]
            torch.testing.assert_close(candidate_logits, ours, atol=1e-4, rtol=1e-4)


def test_anchor_context_head_is_refused(qwen3_target, tmp_path):
    head = JetSpecHead.from_target(qwen3_target, num_hidden_layers=1, block_size=BLOCK, anchor_context=True)
    with torch.no_grad():
        head.mask_embedding.copy_(qwen3_target.get_input_embeddings().weight[MASK_TOKEN])
    reason = dflash_incompatibility(head)
    assert reason is not None and "anchor_context=True" in reason and "anchor_context=False" in reason
    assert "mask_embedding" not in reason  # only what actually differs is named
    with pytest.raises(ValueError, match="anchor_context=True") as error:
        export_dflash(head, tmp_path / "out")
    assert str(error.value) == reason
    assert not (tmp_path / "out").exists()


def test_other_differences_are_named(qwen3_target):
    llama = make_tiny_target("llama", num_hidden_layers=4)
    legacy = JetSpecHead.from_target(llama, num_hidden_layers=1, anchor_context=False, layer_family="target")
    reason = dflash_incompatibility(legacy)
    assert "'llama'" in reason and "q/k RMSNorm" in reason and "learned mask_embedding" in reason
    # a head of a Llama target has Qwen3 layers by default: only its learned mask embedding stands in the way
    reason = dflash_incompatibility(JetSpecHead.from_target(llama, num_hidden_layers=1, anchor_context=False))
    assert "'llama'" not in reason and "learned mask_embedding" in reason

    free_mask = JetSpecHead.from_target(qwen3_target, num_hidden_layers=1, anchor_context=False)
    reason = dflash_incompatibility(free_mask)
    assert "learned mask_embedding" in reason and "closest: token" in reason and "'qwen3'" not in reason

    unbound = JetSpecHead(free_mask.config)
    assert "not bound" in dflash_incompatibility(unbound)
    with torch.no_grad():
        unbound.load_state_dict(exportable_head(qwen3_target, num_hidden_layers=1).state_dict())
    assert dflash_incompatibility(unbound, target_model=qwen3_target) is None


def test_round_trip_from_pretrained(exported):
    head, path = exported
    draft = AutoModel.from_pretrained(path)
    assert type(draft) is MuseGlimmerAssistantModel
    config = draft.config
    assert config._attn_implementation == DFLASH_ATTENTION
    assert (config.block_size, config.mask_token_id) == (BLOCK, MASK_TOKEN)
    assert config.target_layer_ids == head.config.target_layer_ids
    assert config.layer_types == ["full_attention"] * head.config.num_hidden_layers
    ours = head.state_dict()
    theirs = draft.state_dict()
    assert torch.equal(theirs["encoder.fc.weight"], ours["fc.weight"])
    assert torch.equal(theirs["encoder.output_norm_enc.weight"], ours["context_norm.weight"])
    for name, tensor in ours.items():
        if name.startswith(("layers.", "norm.")):
            assert torch.equal(theirs[name], tensor), name
    assert len(theirs) == len(ours) - 1  # everything but mask_embedding (a token id now)
