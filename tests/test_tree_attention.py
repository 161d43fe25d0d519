"""Tree attention: the Triton kernel against a float64 reference, the PyTorch fallback, and
`attn_implementation="jetspec_tree"` end to end.

Triton picks interpreter mode when it is imported, and conftest's imports pull it in first, so the kernel cases
(named `*interpreted*`) run in a child pytest process started with `TRITON_INTERPRET=1` by
`test_kernel_cases_run_under_the_triton_interpreter`. Run them directly with
`TRITON_INTERPRET=1 python -m pytest tests/test_tree_attention.py -k interpreted`.

Tolerances are absolute, against float64: 1e-5 for fp32, 2e-3 for fp16/bf16. Storing a 16-bit output alone costs up
to half an ulp of the output (bf16: 2**-9 for |o| in [0.5, 1)), so values are drawn in [-0.5, 0.5) and outputs stay
below 0.5 in magnitude; `test_interpreted_wide_values_stay_within_one_output_ulp` covers unscaled values.
"""

import copy
import logging
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_target, oracle_for, save_tiny_target
from transformers import AutoModelForCausalLM, DynamicCache

import hf_jetspec
from hf_jetspec import JetSpecHead, build_tree, tree_from_parents
from hf_jetspec import attention as tree_attention_module
from hf_jetspec_kernels import (
    ancestor_mask_from_parents,
    pack_ancestor_mask,
    tree_attention_reference,
    tree_visibility,
    unpack_ancestor_bits,
)

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"  # set before this process imported triton
in_interpreter = pytest.mark.skipif(
    not INTERPRETED, reason="kernel case: runs in the TRITON_INTERPRET=1 child of test_kernel_cases_run_under_..."
)
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-3}
PROMPT = torch.tensor([[5, 17, 42, 8, 61, 3, 29]])


def tree_mask(kind: str, num_nodes: int, seed: int = 0, padding: int = 0) -> torch.BoolTensor:
    """Ancestor mask of a `kind` tree of `num_nodes - padding` nodes, then `padding` rows that see nothing."""
    real = num_nodes - padding
    rng = random.Random(seed)
    if kind == "chain":
        parents = [-1] + list(range(real - 1))
    elif kind == "star":
        parents = [-1] + [0] * (real - 1)
    elif kind == "random":
        parents = [-1] + [rng.randrange(i) for i in range(1, real)]
    elif kind == "bushy":  # what decoding verifies: a best-first tree from random per-depth log-probs
        generator = torch.Generator().manual_seed(seed)
        logprobs = torch.randn(12, 50, generator=generator).mul(3).log_softmax(-1)
        tree = build_tree(0, logprobs, budget=real, topk=7)
        assert tree.num_nodes == real
        parents = tree.parents
    else:
        raise ValueError(kind)
    mask = torch.zeros(num_nodes, num_nodes, dtype=torch.bool)
    mask[:real, :real] = ancestor_mask_from_parents(parents)
    return mask


def random_inputs(num_nodes, prefix, heads, kv_heads, head_dim, dtype, seed=0, value_scale=0.5, batch=1):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, num_nodes, head_dim, generator=generator).to(dtype)
    k = torch.randn(batch, kv_heads, prefix + num_nodes, head_dim, generator=generator).to(dtype)
    v = ((torch.rand(batch, kv_heads, prefix + num_nodes, head_dim, generator=generator) * 2 - 1) * value_scale)
    return q, k, v.to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# Packed masks and the reference (no kernel involved)


@pytest.mark.parametrize("num_nodes", [1, 31, 32, 33, 300, 512])
def test_pack_and_unpack_round_trip(num_nodes):
    mask = torch.rand(3, num_nodes, num_nodes, generator=torch.Generator().manual_seed(num_nodes)) < 0.5
    mask[..., :, -1] = True  # bit 31 of the last word is the int32 sign bit when num_nodes % 32 == 0
    bits = pack_ancestor_mask(mask)
    assert bits.dtype == torch.int32 and bits.shape == (3, num_nodes, -(-num_nodes // 32))
    assert torch.equal(unpack_ancestor_bits(bits, num_nodes), mask)
    assert torch.equal(pack_ancestor_mask(mask[0]), bits[0])


def test_ancestor_mask_matches_draft_tree_and_packs_like_it():
    parents = [-1, 0, 0, 1, 1, 2, 5, 6]
    tree = tree_from_parents(list(range(8)), parents)
    assert torch.equal(ancestor_mask_from_parents(parents), tree.ancestor_mask)
    assert torch.equal(tree.packed_ancestor_bits(), pack_ancestor_mask(tree.ancestor_mask))
    with pytest.raises(ValueError, match="parent"):
        ancestor_mask_from_parents([-1, 2, 0])


def test_reference_matches_sdpa_with_a_dense_mask():
    q, k, v = random_inputs(20, 13, 8, 2, 16, torch.float64)
    bits = pack_ancestor_mask(tree_mask("random", 20, seed=1))
    allowed = tree_visibility(bits, 13)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    torch.testing.assert_close(tree_attention_reference(q, k, v, 13, bits), expected)


def test_reference_zeroes_padding_rows_even_with_a_prefix():
    q, k, v = random_inputs(10, 4, 2, 1, 16, torch.float32)
    bits = pack_ancestor_mask(tree_mask("chain", 10, padding=3))
    out = tree_attention_reference(q, k, v, 4, bits)
    assert torch.isfinite(out).all() and out[:, :, 7:].eq(0).all() and out[:, :, :7].abs().sum(-1).gt(0).all()


# ---------------------------------------------------------------------------------------------------------------
# The PyTorch fallback (CPU without TRITON_INTERPRET) and the registration


class _GQAModule(torch.nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups = groups


def _tree_forward(q, k, v, bits, groups):
    attention_mask = tree_attention_module.packed_tree_mask(bits)
    out, _ = tree_attention_module.jetspec_tree_attention_forward(_GQAModule(groups), q, k, v, attention_mask)
    return out.transpose(1, 2)


def test_fallback_matches_reference_zeroes_padding_and_warns_once(monkeypatch, caplog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    tree_attention_module._warn_fallback_once.cache_clear()
    q, k, v = random_inputs(45, 70, 8, 2, 64, torch.float32, value_scale=1.0)
    bits = pack_ancestor_mask(tree_mask("bushy", 45, padding=5))
    with caplog.at_level(logging.WARNING, logger="hf_jetspec.attention"):
        out = _tree_forward(q, k, v, bits, groups=4)
        _tree_forward(q, k, v, bits, groups=4)
    assert len([r for r in caplog.records if "fallback" in r.getMessage()]) == 1
    assert (out.double() - tree_attention_reference(q, k, v, 70, bits)).abs().max() <= 1e-5
    assert out[:, :, 40:].eq(0).all()


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_jetspec_tree_ordinary_forwards_equal_sdpa(family):
    reference = make_tiny_target(family, seed=3)
    config = copy.deepcopy(reference.config)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="jetspec_tree").eval()
    model.load_state_dict(reference.state_dict())
    assert model.config._attn_implementation == "jetspec_tree" and reference.config._attn_implementation == "sdpa"
    ids = torch.randint(96, (2, 11), generator=torch.Generator().manual_seed(0))
    padding = torch.ones_like(ids)
    padding[1, :4] = 0
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": padding}):
            assert torch.equal(model(ids, **kwargs).logits, reference(ids, **kwargs).logits)
        caches = DynamicCache(config=config), DynamicCache(config=config)
        for chunk in (ids[:, :6], ids[:, 6:9], ids[:, 9:10]):  # prefill, then a chunk and a token over a cache
            ours, theirs = (m(chunk, past_key_values=c).logits for m, c in zip((model, reference), caches))
            assert torch.equal(ours, theirs)


def test_from_pretrained_accepts_jetspec_tree(tmp_path):
    reference, _ = save_tiny_target(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="jetspec_tree")
    assert model.config._attn_implementation == "jetspec_tree"
    with torch.no_grad():
        assert torch.equal(model(PROMPT % 20).logits, reference(PROMPT % 20).logits)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_tree_verify_forward_with_packed_bits_equals_dense_mask(family, monkeypatch):
    """One verify forward over a cached prefix: packed bits under jetspec_tree vs the dense mask under sdpa."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = make_tiny_target(family, seed=4)
    tree = build_tree(7, torch.randn(6, 96).log_softmax(-1), budget=40, topk=4)
    outputs = {}
    for attn in ("sdpa", "jetspec_tree"):
        model.set_attn_implementation(attn)
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(PROMPT, past_key_values=cache)
            mask = (
                tree_attention_module.packed_tree_mask(tree.packed_ancestor_bits())
                if attn == "jetspec_tree"
                else tree.attention_mask(PROMPT.shape[1], torch.float32)
            )
            outputs[attn] = model(
                tree.tokens[None], attention_mask=mask, position_ids=tree.position_ids(PROMPT.shape[1]),
                past_key_values=cache,
            ).logits
    torch.testing.assert_close(outputs["jetspec_tree"], outputs["sdpa"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_generate_with_fallback_equals_plain_generate(family, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    target = make_tiny_target(family, seed=5)
    expected = target.generate(PROMPT, do_sample=False, max_new_tokens=30)
    target.set_attn_implementation("jetspec_tree")
    assert target.generate(PROMPT, do_sample=False, max_new_tokens=30).tolist() == expected.tolist()
    head = oracle_for(target, expected, rank_of_truth=1, block_size=8)
    head.generation_config.tree_budget = 24
    out = target.generate(PROMPT, do_sample=False, max_new_tokens=30, assistant_model=head)
    assert out.tolist() == expected.tolist()
    assert head.last_generate_stats.mean_accepted_length > 1.5


# ---------------------------------------------------------------------------------------------------------------
# Clear errors


def _kernel_launcher():
    from hf_jetspec_kernels.tree_attention import tree_attention

    return tree_attention


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda q, k, v, b: (q.half(), k, v, 4, b), "one dtype"),
        (lambda q, k, v, b: (q.double(), k.double(), v.double(), 4, b), "float16, bfloat16 and float32"),
        (lambda q, k, v, b: (q[0], k, v, 4, b), "4D"),
        (lambda q, k, v, b: (q, k[..., :32], v[..., :32], 4, b), "do not match"),
        (lambda q, k, v, b: (q, k, v, 5, b), "prefix_length \\+ num_nodes"),
        (lambda q, k, v, b: (q[:, :3], k, v, 4, b), "multiple of num_kv_heads"),
        (lambda q, k, v, b: (q, k, v, 4, b.long()), "tree_bits must be int32"),
        (lambda q, k, v, b: (q, k, v, 4, b[:5]), "tree_bits must be int32"),
    ],
    ids=["mixed-dtypes", "float64", "3d-query", "head-dims", "prefix-length", "head-counts", "bits-dtype", "bits-shape"],
)
def test_kernel_launcher_rejects_bad_inputs(change, message):
    q, k, v = random_inputs(6, 4, 4, 2, 64, torch.float32)
    bits = pack_ancestor_mask(tree_mask("chain", 6))
    with pytest.raises(ValueError, match=message):
        _kernel_launcher()(*change(q, k, v, bits))


def test_kernel_launcher_limits_and_device_errors():
    launcher = _kernel_launcher()
    q, k, v = random_inputs(513, 0, 1, 1, 16, torch.float16)
    with pytest.raises(ValueError, match="1 to 512 tree nodes"):
        launcher(q, k, v, 0, pack_ancestor_mask(torch.eye(513, dtype=torch.bool)))
    if not INTERPRETED:  # compiled kernels and CPU tensors: say how to get the interpreter
        q, k, v = random_inputs(4, 2, 2, 1, 64, torch.float32)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            launcher(q, k, v, 2, pack_ancestor_mask(torch.eye(4, dtype=torch.bool)))


def test_attention_function_rejects_bad_tree_masks_and_training():
    q, k, v = random_inputs(6, 4, 4, 2, 64, torch.float32)
    bits = pack_ancestor_mask(tree_mask("chain", 6))
    forward = tree_attention_module.jetspec_tree_attention_forward
    with pytest.raises(ValueError, match="packed tree bits"):
        forward(_GQAModule(2), q, k, v, bits[None, None, :5])
    with pytest.raises(ValueError, match="eval mode"):
        forward(_GQAModule(2), q, k, v, bits[None, None], dropout=0.1)
    with pytest.raises(ValueError, match="sliding_window"):
        forward(_GQAModule(2), q, k, v, bits[None, None], sliding_window=4)
    with pytest.raises(ValueError, match="int32 packed bits"):
        tree_attention_module.packed_tree_mask(bits.bool())


# ---------------------------------------------------------------------------------------------------------------
# Kernel cases, under Triton's interpreter


@pytest.mark.skipif(INTERPRETED, reason="this process already runs under the interpreter")
def test_kernel_cases_run_under_the_triton_interpreter(request):
    """Runs this file's `interpreted` tests in a child with TRITON_INTERPRET=1 (honouring `-m`)."""
    command = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "-k", "interpreted", __file__]
    if request.config.getoption("markexpr"):
        command += ["-m", request.config.getoption("markexpr")]
    child = subprocess.run(
        command, env={**os.environ, "TRITON_INTERPRET": "1"}, cwd=Path(__file__).parents[1],
        capture_output=True, text=True, timeout=900,
    )
    assert child.returncode == 0, f"interpreted kernel cases failed:\n{child.stdout[-8000:]}\n{child.stderr[-4000:]}"
    assert interpreted_cases_passed(child.stdout) > 0, f"the interpreter child ran no kernel case:\n{child.stdout[-4000:]}"


def interpreted_cases_passed(summary: str) -> int:
    """Passed tests in a `pytest -q` summary (`"12 passed, 3 skipped in 4.1s"`); 0 when every case skipped.

    Checked on purpose: with `in_interpreter`'s condition inverted (every case skipped in the child), the child exits
    0 with "1 skipped"-style summaries and this count is 0, so the parent test fails."""
    found = re.findall(r"(\d+) passed", summary.strip().splitlines()[-1] if summary.strip() else "")
    return int(found[0]) if found else 0


KERNEL_CASES = [
    # kind, num_nodes, prefix, heads, kv_heads, head_dim, dtypes
    ("chain", 1, 0, 1, 1, 64, "all"),
    ("star", 1, 5, 8, 1, 128, "all"),
    ("chain", 17, 0, 4, 4, 64, "all"),
    ("star", 33, 63, 8, 2, 64, "all"),
    ("bushy", 64, 128, 8, 1, 128, "all"),
    ("random", 65, 100, 9, 3, 64, "all"),  # SmolLM2-135M's heads
    ("bushy", 129, 1000, 4, 1, 128, "all"),
    ("random", 300, 2048, 1, 1, 128, "bf16"),
    ("bushy", 300, 1024, 8, 1, 64, "fp16"),
    ("chain", 300, 511, 4, 1, 128, "fp32"),
    ("bushy", 256, 1024, 8, 8, 64, "fp32"),
]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _kernel_params():
    for kind, nodes, prefix, heads, kv_heads, dim, dtypes in KERNEL_CASES:
        for name in DTYPES if dtypes == "all" else [dtypes]:
            yield pytest.param(kind, nodes, prefix, heads, kv_heads, dim, DTYPES[name],
                               id=f"{kind}-n{nodes}-p{prefix}-h{heads}/{kv_heads}-d{dim}-{name}")


def _max_error(out, q, k, v, prefix, bits):
    return (out.double() - tree_attention_reference(q, k, v, prefix, bits)).abs().max().item()


@in_interpreter
@pytest.mark.parametrize("kind,num_nodes,prefix,heads,kv_heads,head_dim,dtype", list(_kernel_params()))
def test_interpreted_kernel_matches_float64_reference(kind, num_nodes, prefix, heads, kv_heads, head_dim, dtype):
    q, k, v = random_inputs(num_nodes, prefix, heads, kv_heads, head_dim, dtype, seed=num_nodes + prefix)
    bits = pack_ancestor_mask(tree_mask(kind, num_nodes, seed=prefix))
    out = _kernel_launcher()(q, k, v, prefix, bits)
    assert out.dtype == dtype and out.shape == q.shape and out.transpose(1, 2).is_contiguous()
    assert _max_error(out, q, k, v, prefix, bits) <= TOLERANCE[dtype]


@in_interpreter
@pytest.mark.parametrize("prefix", [0, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_interpreted_padding_rows_are_zero_and_never_nan(prefix, dtype):
    q, k, v = random_inputs(50, prefix, 4, 2, 64, dtype)
    bits = pack_ancestor_mask(tree_mask("bushy", 50, padding=9))
    out = _kernel_launcher()(q, k, v, prefix, bits)
    assert torch.isfinite(out).all() and out[:, :, 41:].eq(0).all()
    assert _max_error(out, q, k, v, prefix, bits) <= TOLERANCE[dtype]


@in_interpreter
@pytest.mark.parametrize("num_splits", [2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_interpreted_prefix_splits_combine_exactly(num_splits, dtype):
    q, k, v = random_inputs(40, 700, 8, 2, 128, dtype, batch=2)
    mask = torch.stack([tree_mask("random", 40, seed=1), tree_mask("bushy", 40, padding=4)])
    bits = pack_ancestor_mask(mask)  # one tree per batch row
    out = _kernel_launcher()(q, k, v, 700, bits, num_splits=num_splits)
    assert _max_error(out, q, k, v, 700, bits) <= TOLERANCE[dtype]
    assert out[1, :, 36:].eq(0).all()


@in_interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_interpreted_wide_values_stay_within_one_output_ulp(dtype):
    """Unscaled values (|o| up to ~3): the error beyond the output's own rounding stays under the tolerance."""
    q, k, v = random_inputs(24, 40, 4, 1, 64, dtype, value_scale=3.0)
    bits = pack_ancestor_mask(tree_mask("chain", 24))
    reference = tree_attention_reference(q, k, v, 40, bits)
    ulp = torch.finfo(dtype).eps * 2.0 ** (torch.frexp(reference)[1] - 1).double()  # of the output's binade
    error = (_kernel_launcher()(q, k, v, 40, bits).double() - reference).abs()
    assert (error <= TOLERANCE[dtype] + ulp).all()


@in_interpreter
def test_interpreted_strided_inputs_and_custom_scale():
    q, k, v = random_inputs(20, 30, 4, 2, 64, torch.float32)
    q_strided = q.transpose(1, 2).contiguous().transpose(1, 2)  # the layout attention layers pass
    bits = pack_ancestor_mask(tree_mask("random", 20))
    out = _kernel_launcher()(q_strided, k, v, 30, bits, scale=0.3)
    assert (out.double() - tree_attention_reference(q, k, v, 30, bits, scale=0.3)).abs().max() <= 1e-5


@in_interpreter
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_interpreted_kernel_generate_equals_plain_generate(family):
    target = make_tiny_target(family, seed=6)
    expected = target.generate(PROMPT, do_sample=False, max_new_tokens=24)
    target.set_attn_implementation("jetspec_tree")
    head = oracle_for(target, expected, rank_of_truth=1, block_size=8)
    head.generation_config.tree_budget = 24
    out = target.generate(PROMPT, do_sample=False, max_new_tokens=24, assistant_model=head)
    assert out.tolist() == expected.tolist()


@in_interpreter
@pytest.mark.slow
def test_interpreted_default_target_jetspec_tree_equals_sdpa():
    """Acceptance: on SmolLM2-135M, generate(assistant_model=head) gives the same tokens with the Triton kernel
    (interpreted) as with sdpa, for an untrained head and a branching oracle head."""
    pytest.importorskip("gguf")
    try:
        model, tokenizer = hf_jetspec.load_default_target(attn_implementation="jetspec_tree")
    except FileNotFoundError as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(error))
    assert model.config._attn_implementation == "jetspec_tree"
    input_ids = hf_jetspec.chat_input_ids(tokenizer, "What is the capital of France?")
    fresh_head = JetSpecHead.from_target(model, num_hidden_layers=1)
    fresh_head.generation_config.tree_budget = 16  # not "auto": its calibration would time interpreted forwards
    outputs = {}
    for attn in ("jetspec_tree", "sdpa"):
        model.set_attn_implementation(attn)
        plain = model.generate(input_ids, do_sample=False, max_new_tokens=16)
        oracle = oracle_for(model, plain, rank_of_truth=1, block_size=16)
        oracle.generation_config.tree_budget = 16
        outputs[attn] = (
            plain,
            model.generate(input_ids, do_sample=False, max_new_tokens=4, assistant_model=fresh_head),
            model.generate(input_ids, do_sample=False, max_new_tokens=16, assistant_model=oracle),
        )
        if attn == "jetspec_tree":
            assert oracle.last_generate_stats.mean_accepted_length > 2  # deep tree paths went through the kernel
    for ours, theirs in zip(outputs["jetspec_tree"], outputs["sdpa"]):
        assert ours.tolist() == theirs.tolist()
    assert outputs["sdpa"][2][0, : outputs["sdpa"][1].shape[1]].tolist() == outputs["sdpa"][1][0].tolist()
