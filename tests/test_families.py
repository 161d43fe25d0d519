"""Every decoder family users run, on tiny random configs built from Transformers' own config classes: greedy output
equal to plain `generate()` at budgets 1, 8, 64 and "auto" and for a left-padded batch of two, with prompts longer
than the sliding window where the family has one (so the window changes plain output: checked below), sampling and
returned logits for families that transform their logits, and what is refused.

Checked by breaking it on purpose: verifying with the full-attention mask on sliding-window layers (the window left
out of `masks.verify_attention_mask`) fails the windowed cases (all four Mistral budgets, checked); computing the
target's logits without Gemma's cap (`target_logits.TargetLogits`) fails the Gemma case (refused by the logits check).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from conftest import OracleHead
from test_batched import BatchOracleHead
from transformers import DynamicCache

from hf_jetspec import JetSpecHead
from hf_jetspec.masks import sliding_window

WINDOW = 16
TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=512, eos_token_id=None, bos_token_id=None,
            pad_token_id=None)
# family -> (config class, model class, config overrides); Gemma 2 and GPT-OSS have no sdpa in Transformers: eager
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen2-sliding": ("Qwen2Config", "Qwen2ForCausalLM",
                      dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "llama-multi-query": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=1)),
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)),
    "mistral-sliding": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW)),
    "mixtral-sliding": ("MixtralConfig", "MixtralForCausalLM",
                        dict(sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(sliding_window=WINDOW, attn_logit_softcapping=20.0, final_logit_softcapping=10.0,
                    query_pre_attn_scalar=8)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(sliding_window=WINDOW, query_pre_attn_scalar=8,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}),
    "granite": ("GraniteConfig", "GraniteForCausalLM",
                dict(embedding_multiplier=3.0, residual_multiplier=0.5, logits_scaling=4.0, attention_multiplier=0.2)),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(no_rope_layer_interval=2)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.25)),
    "gpt-oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2,
                     layer_types=["sliding_attention", "full_attention"] * 2)),
}
EAGER = {"gemma2", "gpt-oss"}
NEW_TOKENS = 40


def make_target(family: str, scale: float = 10.0, **overrides):
    """A tiny random target, weights sharpened so that positions and masks change its greedy tokens."""
    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**TINY, **extra, **overrides})
    config._attn_implementation = "eager" if family in EAGER else "sdpa"
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() >= 2 and "embed" not in name:
                parameter.mul_(scale)
    return model


def prompt(length: int, seed: int = 3) -> torch.LongTensor:
    return torch.randint(1, 96, (1, length), generator=torch.Generator().manual_seed(seed))


def oracle(target, reference, cls=OracleHead):
    head = JetSpecHead.from_target(target, num_hidden_layers=1, block_size=8, anchor_context=False)
    head.__class__ = cls
    if cls is OracleHead:
        head.reference, head.rank_of_truth = reference.flatten(), 1
    else:
        head.references, head.rank_of_truth = list(reference), 1
    return head


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_target(request):
    return request.param, make_target(request.param)


def prompt_length(target) -> int:
    """Longer than the window (40 tokens + 40 new against 16) for windowed families."""
    return 40 if sliding_window(target.config) else 12


@pytest.mark.parametrize("budget", [1, 8, 64, "auto"])
def test_greedy_equals_plain(family_target, budget):
    family, target = family_target
    ids = prompt(prompt_length(target))
    expected = target.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS)
    head = oracle(target, expected)
    head.generation_config.tree_budget = budget
    out = target.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS, assistant_model=head)
    assert out.tolist() == expected.tolist(), family
    if budget == 64:
        assert head.last_generate_stats.mean_accepted_length > 2  # the trees were accepted, not just roots


@pytest.mark.parametrize("budget", [16, "auto"])
def test_left_padded_batch_equals_plain(family_target, budget):
    family, target = family_target
    long = prompt_length(target)
    lengths = (long, long * 2 // 3)
    width = max(lengths)
    ids, mask = torch.zeros(2, width, dtype=torch.long), torch.zeros(2, width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length:] = prompt(length, seed=5 + row)[0]
        mask[row, width - length:] = 1
    kwargs = dict(attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=0)
    expected = target.generate(ids, **kwargs)
    references = [torch.cat([expected[row, :width][mask[row].bool()], expected[row, width:]]) for row in range(2)]
    head = oracle(target, references, cls=BatchOracleHead)
    head.generation_config.tree_budget = budget
    out = target.generate(ids, assistant_model=head, **kwargs)
    assert out.tolist() == expected.tolist(), family


def test_the_window_matters_for_the_windowed_families():
    """Without this the windowed cases above could pass with the window ignored."""
    for family in [name for name in FAMILIES if sliding_window(make_target(name).config)]:
        ids = prompt(40)
        windowed = make_target(family).generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS)
        unwindowed = make_target(family, sliding_window=10_000).generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS)
        assert windowed.tolist() != unwindowed.tolist(), family


def test_a_user_passed_empty_cache_is_exact_on_a_sliding_window_target():
    target = make_target("mistral-sliding")
    ids = prompt(40)
    expected = target.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS)
    head = oracle(target, expected)
    head.generation_config.tree_budget = 8
    out = target.generate(ids, do_sample=False, max_new_tokens=NEW_TOKENS, assistant_model=head,
                          past_key_values=DynamicCache())
    assert out.tolist() == expected.tolist()


@pytest.mark.parametrize("family,overrides", [("granite", {}), ("cohere", {}),
                                              ("gemma3", dict(layer_types=["full_attention"] * 4,
                                                              final_logit_softcapping=3.0))])
def test_logit_transforms_keep_sampling_and_logits_exact(family, overrides):
    """Granite divides its logits, Cohere scales them, Gemma caps them: sampling (same seed) and returned logits
    equal plain generate()'s, and greedy with a repetition penalty (not invariant under a cap) too."""
    target = make_target(family, **overrides)
    ids = prompt(12)
    torch.manual_seed(0)
    expected = target.generate(ids, do_sample=True, top_k=0, max_new_tokens=NEW_TOKENS)
    head = oracle(target, expected)
    head.generation_config.tree_budget = 8
    torch.manual_seed(0)
    out = target.generate(ids, do_sample=True, top_k=0, max_new_tokens=NEW_TOKENS, assistant_model=head)
    assert out.tolist() == expected.tolist()

    kwargs = dict(do_sample=False, max_new_tokens=20, return_dict_in_generate=True, output_logits=True,
                  repetition_penalty=1.5)
    expected = target.generate(ids, **kwargs)
    head = oracle(target, expected.sequences)
    head.generation_config.tree_budget = 8
    out = target.generate(ids, assistant_model=head, **kwargs)
    assert out.sequences.tolist() == expected.sequences.tolist()
    assert max(float((a - b).abs().max()) for a, b in zip(out.logits, expected.logits)) < 1e-4


def test_tree_attention_kernel_is_refused_for_sliding_windows():
    target = make_target("mistral-sliding")
    target.config._attn_implementation = "jetspec_tree"
    head = JetSpecHead.from_target(target, num_hidden_layers=1, block_size=4, anchor_context=False)
    with pytest.raises(ValueError, match="sliding window"):
        target.generate(prompt(8), do_sample=False, max_new_tokens=4, assistant_model=head)


def test_an_unknown_logit_transform_is_refused():
    """A family whose forward does something to its logits that TargetLogits does not know is refused, not run."""
    target = make_target("llama")

    class Shifted(type(target)):
        def forward(self, *args, **kwargs):
            output = super().forward(*args, **kwargs)
            output.logits = output.logits * -1.0
            return output

    target.__class__ = Shifted
    head = JetSpecHead.from_target(target, num_hidden_layers=1, block_size=4, anchor_context=False)
    with pytest.raises(ValueError, match="not supported"):
        target.generate(prompt(8), do_sample=False, max_new_tokens=4, assistant_model=head)


def test_a_gemma3_head_trains_a_few_steps_and_runs(tmp_path):
    from conftest import tiny_tokenizer
    from test_training import short_run_config, write_prompts

    from hf_jetspec_training.train import train

    tokenizer = tiny_tokenizer()
    target = make_target("gemma3", scale=1.0, vocab_size=len(tokenizer))
    prompts = tmp_path / "prompts.jsonl"
    write_prompts(prompts, 8)
    trainer, final_dir = train(short_run_config(tmp_path, prompts, max_steps=3, anchor_context=False), target=target,
                               tokenizer=tokenizer)
    head = JetSpecHead.from_pretrained(final_dir)
    assert head.config.draft_model_type == "qwen3" and head.config.target_model_type == "gemma3_text"
    ids = torch.randint(1, len(tokenizer), (1, 20), generator=torch.Generator().manual_seed(0))
    expected = target.generate(ids, do_sample=False, max_new_tokens=12)
    out = target.generate(ids, do_sample=False, max_new_tokens=12, assistant_model=head)
    assert out.tolist() == expected.tolist()
