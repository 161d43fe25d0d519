"""The head follows the target's device and dtype: an eval-mode head is cast (and moved) by `bind()`, so a bf16 or
fp16 target runs with a head loaded in fp32; a head in training mode is never cast behind its optimizer's back."""

import pytest
import torch
from conftest import make_tiny_target, oracle_for

from hf_jetspec import JetSpecHead

PROMPT = torch.tensor([[5, 17, 42, 8, 61, 3, 29]])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_an_fp32_head_runs_a_half_precision_target_exactly(family, dtype, tmp_path):
    target = make_tiny_target(family, seed=2).to(dtype)
    expected = target.generate(PROMPT, do_sample=False, max_new_tokens=32)
    head = oracle_for(target.float(), expected).eval()  # built (and left) in fp32, like a loaded fp32 checkpoint
    target.to(dtype)
    assert head.dtype == torch.float32
    head.generation_config.tree_budget = 8
    out = target.generate(PROMPT, do_sample=False, max_new_tokens=32, assistant_model=head)
    assert head.dtype == dtype  # cast in place by bind()
    assert out.tolist() == expected.tolist()
    assert head.last_generate_stats.mean_accepted_length > 3  # the drafts were used, not just rejected


def test_a_loaded_head_follows_a_bf16_target(tmp_path):
    target = make_tiny_target("qwen3", seed=4)
    JetSpecHead.from_target(target, num_hidden_layers=1, block_size=4).save_pretrained(tmp_path / "head")
    target.to(torch.bfloat16)
    head = JetSpecHead.from_pretrained(tmp_path / "head")
    assert head.dtype == torch.float32 and not head.training
    expected = target.generate(PROMPT, do_sample=False, max_new_tokens=12)
    out = target.generate(PROMPT, do_sample=False, max_new_tokens=12, assistant_model=head)
    assert out.tolist() == expected.tolist() and head.dtype == torch.bfloat16


def test_a_head_in_training_mode_is_not_cast_and_says_what_to_do():
    target = make_tiny_target("llama", seed=1).to(torch.bfloat16)
    head = JetSpecHead.from_target(make_tiny_target("llama", seed=1), num_hidden_layers=1, block_size=4).train()
    with pytest.raises(ValueError, match=r"training mode.*head.eval\(\)"):
        target.generate(PROMPT, do_sample=False, max_new_tokens=4, assistant_model=head)
    assert head.dtype == torch.float32

