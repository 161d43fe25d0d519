"""`pipeline("text-generation", model=target, tokenizer=tok, assistant_model=head)`: Transformers' pipeline runs the
tree loop and returns what the plain pipeline returns (greedy), for text and chat inputs."""

from __future__ import annotations

import pytest
from conftest import make_tiny_target, tiny_tokenizer
from transformers import pipeline

from hf_jetspec import JetSpecHead


@pytest.mark.parametrize("chat", [False, True])
def test_text_generation_pipeline_with_a_head_equals_plain(chat):
    """Checked by breaking it: without the head config's top-level token ids the pipeline raised
    `AttributeError: 'JetSpecConfig' object has no attribute 'eos_token_id'`."""
    tokenizer = tiny_tokenizer()
    target = make_tiny_target("qwen3", seed=1, vocab_size=len(tokenizer))
    head = JetSpecHead.from_target(target, num_hidden_layers=1, block_size=6)
    assert (head.config.eos_token_id, head.config.pad_token_id) == (target.config.eos_token_id,
                                                                    target.config.pad_token_id)
    prompt = [{"role": "user", "content": "the cat sat on"}] if chat else "the cat sat on the mat and"
    plain = pipeline("text-generation", model=target, tokenizer=tokenizer)(prompt, max_new_tokens=16, do_sample=False)
    jetspec = pipeline("text-generation", model=target, tokenizer=tokenizer, assistant_model=head)
    head.last_generate_stats = None
    assert jetspec(prompt, max_new_tokens=16, do_sample=False) == plain
    assert head.last_generate_stats is not None and head.last_generate_stats.new_tokens > 0  # the tree loop ran
