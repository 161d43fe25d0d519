"""MKL-packed float32 linears for verify forwards: same products, on the calling thread only, token-identical generate."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_target, oracle_for

import hf_jetspec.packed_linear as packed_linear
from hf_jetspec.packed_linear import PackedLinears, mkl_packing_available, packed_linears, packed_linears_for

pytestmark = pytest.mark.skipif(not mkl_packing_available(), reason="this PyTorch has no MKL weight packing")


def packing_on() -> bool:
    """Whether this thread runs packed products now (inside `PackedLinears.use`)."""
    return getattr(packed_linear._ACTIVE, "table", None) is not None


def forced(decoder, min_rows):
    """`PackedLinears` of every linear of `decoder` with the given row counts (no timing)."""
    linears = [module for module in decoder.modules() if type(module) is torch.nn.Linear]
    packed = {size: [torch.ops.mkl._mkl_reorder_linear_weight(layer.weight, size) for layer in linears]
              for size in min_rows}
    return PackedLinears(linears, packed, min_rows)


@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 9])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_products_equal_unpacked_and_other_row_counts_stay_unpacked(rows, bias):
    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 40, bias=bias)
    packed = forced(torch.nn.Sequential(layer), {4: 3, 8: 5})
    inputs = torch.randn(1, rows, 48)
    expected = layer(inputs)
    with torch.no_grad(), packed.use(rows):
        assert packing_on() == (rows in (3, 4, 5, 8))
        out = layer(inputs)
    assert not packing_on()
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert packed.rows_for(rows) == {3: 4, 4: 4, 5: 8, 8: 8}.get(rows)


def test_background_packing_runs_unpacked_until_a_row_count_is_ready(monkeypatch):
    """Packing measured by an earlier process happens in a thread: forwards before it finishes run unpacked (same
    output), after it packed."""
    import threading

    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 40)
    release = threading.Event()
    real = torch.ops.mkl._mkl_reorder_linear_weight

    def held(weight, size):
        release.wait(timeout=60)
        return real(weight, size)

    monkeypatch.setattr(torch.ops.mkl, "_mkl_reorder_linear_weight", held)
    packed = PackedLinears([layer], None, {4: 3})
    inputs = torch.randn(1, 4, 48)
    expected = layer(inputs)
    with torch.no_grad(), packed.use(4):
        assert not packing_on()  # not packed yet: unpacked
        torch.testing.assert_close(layer(inputs), expected, rtol=1e-5, atol=1e-5)
    release.set()
    packed.wait()
    with torch.no_grad(), packed.use(4):
        assert packing_on()
        torch.testing.assert_close(layer(inputs), expected, rtol=1e-5, atol=1e-5)


def test_forwards_are_restored_after_an_error_and_changed_weights_are_measured_again(monkeypatch):
    target = make_tiny_target("llama")
    decoder = target.model
    packed = forced(decoder, {4: 4})
    with pytest.raises(RuntimeError), packed.use(4):
        raise RuntimeError("a failing forward")
    assert not packing_on()

    measured = []
    monkeypatch.setattr(PackedLinears, "measure",
                        classmethod(lambda cls, decoder, memory_bytes=None: measured.append(1) or packed))
    monkeypatch.setattr(packed_linear, "_PACKED", type(packed_linear._PACKED)())
    assert packed_linears_for(decoder) is packed and packed_linears_for(decoder) is packed
    assert measured == [1]
    with torch.no_grad():
        decoder.layers[0].mlp.up_proj.weight.mul_(1.0)  # in place: a new version of the weight
    packed_linears_for(decoder)
    assert measured == [1, 1]


def test_measure_respects_the_switch_the_memory_cap_and_foreign_forwards(monkeypatch):
    decoder = make_tiny_target("llama").model
    monkeypatch.setenv(packed_linear.ENV_TRANSPOSED, "0")  # packing alone here (transposed products: below)
    assert PackedLinears.measure(decoder, memory_bytes=0) is None  # no room for one copy
    monkeypatch.setenv("HF_JETSPEC_PACKED_LINEARS", "0")
    assert PackedLinears.measure(decoder, memory_bytes=1 << 30) is None
    monkeypatch.delenv("HF_JETSPEC_PACKED_LINEARS")
    for module in decoder.modules():
        if type(module) is torch.nn.Linear:
            module.forward = module.forward  # e.g. an accelerate hook: left alone
    assert PackedLinears.measure(decoder, memory_bytes=1 << 30) is None


def test_packed_linears_leaves_training_forwards_alone():
    target = make_tiny_target("llama")
    packed = forced(target.model, {4: 1})
    with torch.enable_grad(), packed_linears(packed, 4):
        assert not packing_on()
    with torch.no_grad(), packed_linears(packed, 4):
        assert packing_on()
    with torch.no_grad(), packed_linears(None, 4):
        assert not packing_on()


def test_other_threads_run_the_unpacked_product_while_one_thread_runs_packed():
    """A forward on another thread during a packed verify forward (any row count) gets nn.Linear's own product,
    bit for bit; the packed thread gets the packed one."""
    import threading

    torch.manual_seed(0)
    layer = torch.nn.Linear(48, 40)
    packed = forced(torch.nn.Sequential(layer), {4: 3})
    results = {}

    def other():
        for rows in (1, 4, 9):
            inputs = torch.randn(rows, 48)
            results[rows] = torch.equal(layer(inputs), torch.nn.functional.linear(inputs, layer.weight, layer.bias))

    with torch.no_grad(), packed.use(4):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        mine = torch.randn(4, 48)
        packed_out = layer(mine)
    assert results == {1: True, 4: True, 9: True}
    torch.testing.assert_close(packed_out, torch.nn.functional.linear(mine, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def oracle_generate(target, prompt, mask, expected):
    """generate() with an oracle head that knows `expected` (one row: ranked second; a batch: per row), budget 8."""
    if prompt.shape[0] == 1:
        head = oracle_for(target, expected, rank_of_truth=1)
    else:
        from test_batched import batch_oracle_for, real_tokens

        head = batch_oracle_for(target, real_tokens(expected, mask))
    head.generation_config.tree_budget = 8
    return target.generate(prompt, attention_mask=mask, do_sample=False, max_new_tokens=24, pad_token_id=0,
                           assistant_model=head)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("batch", [1, 2])
def test_generate_with_packed_verify_forwards_equals_plain_generate(family, batch, monkeypatch):
    target = make_tiny_target(family, seed=7)
    prompt = torch.tensor([[5, 17, 42, 9, 33, 8], [0, 0, 11, 3, 27, 64]])[:batch]
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])[:batch]
    expected = target.generate(prompt, attention_mask=mask, do_sample=False, max_new_tokens=24, pad_token_id=0)
    packed = forced(target.model, {4: 3, 8: 5, 16: 9, 32: 17})
    monkeypatch.setattr(packed_linear, "_PACKED", type(packed_linear._PACKED)({target.model: (None, packed)}))
    used = []
    original = PackedLinears.use

    def spy(self, rows):
        used.append(self.rows_for(rows))
        return original(self, rows)

    monkeypatch.setattr(PackedLinears, "use", spy)
    assert oracle_generate(target, prompt, mask, expected).tolist() == expected.tolist()
    assert any(size is not None for size in used)  # some verify forwards ran packed
    assert not packing_on()


def test_memory_cap_is_a_setting_a_target_that_does_not_fit_runs_unpacked_and_the_allocation_is_logged(
        monkeypatch, caplog):
    """The cap comes from the head's generation config, else `HF_JETSPEC_PACKED_MAX_MB`, else a share of the
    available memory; a decoder whose weights do not fit runs unpacked (and says so), one that fits logs what it
    allocated, within the cap. Checked on purpose: with `packed_linears_for` ignoring its cap (measuring under the
    default share), the "does not fit" call packed and this test failed."""
    from transformers import GenerationConfig

    monkeypatch.setenv(packed_linear.ENV_TRANSPOSED, "0")  # packing alone here (transposed products: below)

    monkeypatch.setattr(packed_linear, "_PACKED", type(packed_linear._PACKED)())
    monkeypatch.delenv(packed_linear.ENV_MAX_MB, raising=False)
    assert packed_linear.packed_memory_cap(GenerationConfig()) is None  # default: the share of available memory
    monkeypatch.setenv(packed_linear.ENV_MAX_MB, "64")
    assert packed_linear.packed_memory_cap(None) == 64 * 2**20
    assert packed_linear.packed_memory_cap(GenerationConfig(packed_weights_max_mb=0.5)) == 2**19  # config first
    for bad in ("-1", "lots"):
        with pytest.raises(ValueError, match="packed_weights_max_mb must be a number of megabytes"):
            packed_linear.packed_memory_cap(GenerationConfig(packed_weights_max_mb=bad))
    monkeypatch.setenv(packed_linear.ENV_MAX_MB, "many")
    with pytest.raises(ValueError, match="HF_JETSPEC_PACKED_MAX_MB must be"):
        packed_linear.packed_memory_cap(None)
    monkeypatch.delenv(packed_linear.ENV_MAX_MB)

    # Every packed product timed faster than the unpacked one, so the cap alone decides what is kept.
    calls = iter([0.5, 1.0] * 100)
    monkeypatch.setattr(packed_linear, "median_seconds", lambda fn, repeats, device: fn() or next(calls))
    decoder = make_tiny_target("llama").model
    copy = sum(m.weight.numel() * 4 for m in decoder.modules() if type(m) is torch.nn.Linear)
    with caplog.at_level("WARNING", logger=packed_linear.__name__):
        assert packed_linears_for(decoder, copy - 1) is None  # not one copy fits
        assert "do not fit the memory cap" in caplog.text and "run unpacked" in caplog.text
        caplog.clear()
        found = packed_linears_for(decoder, 2 * copy)  # another cap: measured again, two copies fit
        assert found is not None and found.nbytes == 2 * copy and len(found.min_rows) == 2
        assert "2 copies" in caplog.text and "packed_weights_max_mb" in caplog.text
        caplog.clear()
        assert packed_linears_for(decoder, 2 * copy) is found and not caplog.text  # logged once

    # generate() reads the cap from the head's generation config: 0 leaves the target unpacked.
    target = make_tiny_target("llama")
    head = oracle_for(target, torch.arange(40) % 90, rank_of_truth=0)
    head.generation_config.tree_budget, head.generation_config.packed_weights_max_mb = 4, 0
    target.generate(torch.tensor([[1, 2, 3]]), do_sample=False, max_new_tokens=4, assistant_model=head)
    assert packed_linear._PACKED[target.model] == (0, None)

