"""Export of JetSpec heads to vLLM's DFlash drafter layout (`DFlashDraftModel`), checked against a plain-PyTorch
rendering of vLLM's drafter math that reads only the exported files (`hf_jetspec.vllm_export.reference_drafts`)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_target
from safetensors.torch import load_file

from hf_jetspec import JetSpecHead, export_vllm, vllm_incompatibility
from hf_jetspec.verify import tap_features
from hf_jetspec.vllm_export import head_drafts, reference_drafts


def trained_like(head):
    """Moves every weight off its initial value, so that a wrong mapping shows up in the drafts."""
    torch.manual_seed(5)
    with torch.no_grad():
        for param in head.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return head


@pytest.mark.parametrize("family,causal", [("qwen3", True), ("llama", True), ("qwen3", False)])
@pytest.mark.parametrize("draft_vocab", [False, True])
def test_export_drafts_like_the_head(family, causal, draft_vocab, tmp_path):
    target = make_tiny_target(family, seed=2, num_hidden_layers=6)
    head = trained_like(JetSpecHead.from_target(target, num_hidden_layers=2, block_size=6, anchor_context=False,
                                                causal_block=causal))
    if draft_vocab:
        head.set_draft_vocab(torch.arange(0, 96, 2))
    path = export_vllm(head, tmp_path / "out")  # verifies itself with reference_drafts
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"] and config["model_type"] == "qwen3"
    assert config["dflash_config"]["causal"] is causal  # vLLM's own default is a bidirectional block
    assert config["dflash_config"]["target_layer_ids"] == head.config.target_layer_ids
    assert config["vocab_size"] == 96
    weights = load_file(str(path / "model.safetensors"))
    assert "hidden_norm.weight" in weights and "fc.weight" in weights and "embed_tokens.weight" not in weights
    assert not any(name.startswith("model.") for name in weights)
    if draft_vocab:
        assert config["draft_vocab_size"] == 48 and weights["lm_head.weight"].shape == (48, 32)
        assert torch.equal(torch.arange(48) + weights["d2t"], torch.arange(0, 96, 2))
    else:
        assert "lm_head.weight" not in weights and "d2t" not in weights
    mask = torch.load(path / "mask_embedding.pt")
    assert torch.equal(mask["embedding"], head.mask_embedding.detach())
    assert "vllm serve" in (path / "README.md").read_text()

    # drafts from real tap features of the target, several anchors, equal to the head's
    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        taps = tap_features(target(ids, output_hidden_states=True).hidden_states, head.config.target_layer_ids)[0]
    for n in (3, 7, 9):
        anchor = int(ids[0, n])
        ours = head_drafts(head, taps[:n], anchor, 5)
        theirs = reference_drafts(path, target.get_input_embeddings().weight, target.get_output_embeddings().weight,
                                  taps[:n], anchor, 5)
        assert ours == theirs


def test_reference_catches_a_wrong_mapping(tmp_path):
    """The check has teeth: a bidirectional block, or a swapped norm, drafts differently and fails."""
    target = make_tiny_target("qwen3", seed=2, num_hidden_layers=6)
    head = trained_like(JetSpecHead.from_target(target, num_hidden_layers=2, block_size=8, anchor_context=False))
    path = export_vllm(head, tmp_path / "out")
    embed, lm_head = target.get_input_embeddings().weight, target.get_output_embeddings().weight
    taps = torch.randn(20, 6, head.fc.in_features, generator=torch.Generator().manual_seed(1))
    config = json.loads((path / "config.json").read_text())
    config["dflash_config"]["causal"] = False
    (path / "config.json").write_text(json.dumps(config))
    differs = sum(head_drafts(head, t, 3, 7) != reference_drafts(path, embed, lm_head, t, 3, 7) for t in taps)
    assert differs > 0


def test_refusals_name_the_reason(tmp_path):
    target = make_tiny_target("llama", num_hidden_layers=6)
    with pytest.raises(ValueError, match="anchor_context=True"):
        export_vllm(JetSpecHead.from_target(target, anchor_context=True), tmp_path / "a")
    legacy = JetSpecHead.from_target(target, anchor_context=False, layer_family="target")
    assert "'llama' layers" in vllm_incompatibility(legacy)
    last = JetSpecHead.from_target(target, anchor_context=False, target_layer_ids=[1, 5])
    assert "last layer" in vllm_incompatibility(last)
    unbound = JetSpecHead(JetSpecHead.from_target(target, anchor_context=False).config)
    assert "not bound" in vllm_incompatibility(unbound)
    assert not (tmp_path / "a").exists()


def test_builders_of_one_vllm_venv_take_turns(tmp_path, monkeypatch):
    """CI starts building the vLLM venv in the background while the suite runs; the test fixture's `build_venv` then
    waits for that build instead of deleting and rebuilding the folder under it. Checked by breaking it: without the
    lock the two builds overlap and this test fails."""
    import threading
    import time

    import hf_jetspec.vllm_server as vllm_server

    active, overlaps, built = [0], [], []

    def slow_build(venv, python, timeout):
        active[0] += 1
        overlaps.append(active[0])
        time.sleep(0.3)
        built.append(venv)
        active[0] -= 1
        return venv

    monkeypatch.setattr(vllm_server, "_build_venv", slow_build)
    threads = [threading.Thread(target=vllm_server.build_venv, args=(tmp_path / "venv",)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(built) == 3 and max(overlaps) == 1
    assert (tmp_path / "venv.lock").exists()
