"""The transposed product `(weight @ input.T).T` for verify forwards and accept's lm_head where measured faster: same
products up to rounding, at the measured row counts only, token-identical generate. (No MKL needed.)"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_target
from test_packed_linear import oracle_generate

import hf_jetspec.packed_linear as packed_linear
from hf_jetspec.packed_linear import PackedLinears


def packing_on() -> bool:
    """Whether this thread runs packed or transposed products now (inside `PackedLinears.use`)."""
    return getattr(packed_linear._ACTIVE, "table", None) is not None


@pytest.mark.parametrize("rows", [1, 2, 5, 9])
@pytest.mark.parametrize("bias", [False, True])
def test_transposed_products_equal_linear_at_their_row_counts_only(rows, bias):
    """The transposed product (one row run as two) is `F.linear`'s up to rounding, in the input's shape, contiguous;
    row counts outside `transposed_rows` keep their packed or unpacked product."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 40, bias=bias)
    packed = PackedLinears([layer], {}, {}, transposed_rows=(1, 2, 5))
    inputs = torch.randn(1, rows, 48)
    expected = layer(inputs)
    with torch.no_grad(), packed.use(rows):
        assert packing_on() == (rows in (1, 2, 5))
        out = layer(inputs)
    assert not packing_on() and out.shape == expected.shape and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert packed.kernels == {"packed": {}, "transposed": [1, 2, 5]} and packed.nbytes == 0


def test_measure_keeps_the_transposed_product_where_it_times_faster(monkeypatch):
    """Timed faster at every probe, every row count up to the last probe runs it; timed slower, none does (and with
    nothing packed either, there is nothing to dispatch). The switch turns it off untimed."""
    monkeypatch.setattr(packed_linear, "mkl_packing_available", lambda: False)
    linear_calls = []
    real_linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *args: linear_calls.append(1) or real_linear(*args))

    def timed(transposed_seconds):
        def median_seconds(function, repeats, device):
            before = len(linear_calls)
            function()
            return 1.0 if len(linear_calls) > before else transposed_seconds
        return median_seconds

    decoder = make_tiny_target("llama").model
    monkeypatch.setattr(packed_linear, "median_seconds", timed(0.5))
    found = PackedLinears.measure(decoder)
    assert found is not None and found.transposed_rows == set(range(1, packed_linear.TRANSPOSED_PROBES[-1] + 1))
    assert not found.min_rows and found.nbytes == 0
    monkeypatch.setattr(packed_linear, "median_seconds", timed(2.0))
    assert PackedLinears.measure(decoder) is None
    monkeypatch.setenv(packed_linear.ENV_TRANSPOSED, "0")
    monkeypatch.setattr(packed_linear, "median_seconds", lambda *args: pytest.fail("timed with both switched off"))
    assert PackedLinears.measure(decoder) is None


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("batch", [1, 2])
def test_generate_with_transposed_verify_forwards_and_lm_head_equals_plain_generate(family, batch, monkeypatch):
    """Verify forwards with every linear transposed, and accept's lm_head transposed (greedy through the lm_head:
    no bf16 argmax), give plain generate()'s tokens."""
    from hf_jetspec.projection import PROBE_SIZES, ProjectionCost
    from hf_jetspec.target_logits import TargetLogits

    import hf_jetspec.decoding

    target = make_tiny_target(family, seed=7)
    prompt = torch.tensor([[5, 17, 42, 9, 33, 8], [0, 0, 11, 3, 27, 64]])[:batch]
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])[:batch]
    expected = target.generate(prompt, attention_mask=mask, do_sample=False, max_new_tokens=24, pad_token_id=0)
    linears = [module for module in target.model.modules() if type(module) is torch.nn.Linear]
    packed = PackedLinears(linears, {}, {}, transposed_rows=range(1, 65))
    monkeypatch.setattr(packed_linear, "_PACKED", type(packed_linear._PACKED)({target.model: (None, packed)}))
    cost = ProjectionCost(sizes=PROBE_SIZES, seconds=(1.0,) * len(PROBE_SIZES), transposed=(True,) * len(PROBE_SIZES))
    monkeypatch.setattr(hf_jetspec.decoding, "measure_projection", lambda model: cost)
    monkeypatch.setenv("HF_JETSPEC_BF16_PATHS", "0")
    ran = {"verify": 0, "lm_head": 0}
    original_use, original_logits = PackedLinears.use, TargetLogits.forward

    def use(self, rows):
        ran["verify"] += rows in self.transposed_rows
        return original_use(self, rows)

    def logits(self, hidden_states, product=None):
        ran["lm_head"] += product is packed_linear.transposed_linear
        return original_logits(self, hidden_states, product)

    monkeypatch.setattr(PackedLinears, "use", use)
    monkeypatch.setattr(TargetLogits, "forward", logits)
    assert oracle_generate(target, prompt, mask, expected).tolist() == expected.tolist()
    assert ran["verify"] and ran["lm_head"]
    assert not packing_on()


def test_the_projection_cost_says_which_row_counts_run_the_lm_head_transposed(monkeypatch):
    from hf_jetspec.projection import ProjectionCost, measure_projection

    cost = ProjectionCost(sizes=(1, 2, 4), seconds=(3.0, 1.0, 2.0), transposed=(False, True, True))
    assert [cost.runs_transposed(rows) for rows in (1, 2, 3, 4, 8)] == [False, True, False, True, False]
    assert not ProjectionCost(sizes=(1, 2), seconds=(1.0, 1.0)).runs_transposed(2)
    with pytest.raises(ValueError, match="`transposed` must be empty or match `sizes`"):
        ProjectionCost(sizes=(1, 2), seconds=(1.0, 1.0), transposed=(True,))
    measured = measure_projection(make_tiny_target("llama"), sizes=(1, 2, 4), repeats=1)
    assert len(measured.transposed) == 3  # timed both ways (an fp32 nn.Linear on CPU)
    monkeypatch.setenv(packed_linear.ENV_TRANSPOSED, "0")
    assert measure_projection(make_tiny_target("llama"), sizes=(1, 2, 4), repeats=1).transposed == ()
